"""The perplexity table: dense plus methods x modes x levels, calibrated once, cached row by row."""
from __future__ import annotations

import time

from torch import nn

from wisparse.alpha import check_alpha_selector
from wisparse.calibration import collect_stats
from wisparse.config import projection_numels
from wisparse.data import role_windows
from wisparse.eval.cache import ResultCache
from wisparse.eval.perplexity import perplexity
from wisparse.saliency import DEFAULT_ALPHA_GRID
from wisparse.sparsify import sparsify_, unsparsify_

SELECTOR_VERSION = 4  # bump when the alpha selection changes, so cached wisparse rows are recomputed


def fingerprint_summary(model: nn.Module) -> str:
    return f"{model.config.model_type}/{model.config.num_hidden_layers}L/{model.config.hidden_size}"


def ppl_table(
    model: nn.Module,
    tokenizer,
    runs: list[tuple[str, str, float]],
    *,
    data_dir: str | None,
    eval_windows: int,
    calib_windows: int,
    window_len: int = 2048,
    selection_windows: int = 4,
    alpha_search: str = "block",
    alpha_criterion: str = "kl",
    alpha_min_z: float = 0.0,
    dev_windows: int = 0,
    sequential: bool = True,
    positions: float = 1.0,
    cache: ResultCache | None = None,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """One row per (method, mode, sparsity) of `runs` (method "dense" for the dense model). With `dev_windows`,
    wisparse rows also get `dev_ppl` on WikiText-2 validation windows: a way to compare alpha selectors without
    test perplexity."""
    from wisparse import bos_id, calibrate

    check_alpha_selector(alpha_search, alpha_criterion)
    cache = cache or ResultCache(None)
    bos = bos_id(model, tokenizer)
    evaluation = role_windows("evaluation", tokenizer, window_len, eval_windows, data_dir, bos)
    numels = projection_numels(model)
    down_share = sum(v for k, v in numels.items() if k.endswith("down_proj")) / sum(numels.values())
    setting = dict(model=fingerprint_summary(model), dtype=str(next(model.parameters()).dtype),
                   eval_windows=len(evaluation), window_len=window_len, calib_windows=calib_windows,
                   sequential=sequential, positions=positions)
    selector = dict(selection_windows=selection_windows, alpha_search=alpha_search, alpha_criterion=alpha_criterion,
                    alpha_grid=DEFAULT_ALPHA_GRID, selector=SELECTOR_VERSION)
    # added only when set, so the rows cached before these options existed still match
    if alpha_min_z > 0:
        selector["alpha_min_z"] = alpha_min_z
    if dev_windows > 0:
        selector["dev_windows"] = dev_windows
        development = role_windows("development", tokenizer, window_len, dev_windows, data_dir, bos)
    stats = calib = selection = None
    rows = []
    for method, mode, sparsity in runs:
        spec = dict(setting, method=method, mode=mode, sparsity=sparsity, **(selector if method == "wisparse" else {}))
        row = cache.get(spec)
        if row is None:
            start = time.perf_counter()
            config = None
            if method != "dense":
                if stats is None:
                    calib = role_windows("calibration", tokenizer, window_len, calib_windows, data_dir, bos)
                    selection = role_windows("selection", tokenizer, window_len, selection_windows, data_dir, bos)
                    stats = collect_stats(model, calib, progress=progress)
                config = calibrate(model, tokenizer, method, sparsity, mode, data_dir=data_dir,
                                   calib_windows=calib_windows, window_len=window_len,
                                   selection_windows=selection_windows, alpha_search=alpha_search,
                                   alpha_criterion=alpha_criterion, alpha_min_z=alpha_min_z,
                                   sequential=sequential, positions=positions,
                                   stats=stats, calib_tokens=calib, selection_tokens=selection, progress=progress)
                sparsify_(model, config)
            calib_seconds = time.perf_counter() - start
            result = perplexity(model, evaluation, progress=progress)
            dev = perplexity(model, development, progress=progress) if method == "wisparse" and dev_windows else None
            unsparsify_(model)
            realised = result["sparsity"].get("model", 0.0)
            row = {
                "method": method, "mode": mode if method != "dense" else "-",
                "allocation": "uniform" if method != "dense" else "-",
                "sparsity_nominal": sparsity, "sparsity_realised": round(realised, 4),
                "ppl": round(result["ppl"], 3), "eval_windows": result["windows"],
                "eval_tokens": result["tokens"],
                "calib_tokens": 0 if config is None else config.calibration.get("tokens", 0),
                "selection_tokens": 0 if config is None else config.calibration.get("selection_tokens", 0),
                "calib_seconds": round(calib_seconds, 1), "eval_seconds": round(result["seconds"], 1),
                "by_site": {k: round(v, 3) for k, v in result["sparsity"].get("by_site", {}).items()},
                "positions": "all" if positions >= 1 else f"last {positions:.0%}",
            }
            if dev is not None:
                row["dev_ppl"] = round(dev["ppl"], 3)
            if method == "cats":
                row["sparsity_nominal_intermediate"] = sparsity
                row["sparsity_nominal"] = round(sparsity * down_share, 4)
                row["sparsity_model_cats"] = f"{sparsity:.2f} of MLP intermediate = {sparsity * down_share:.3f} model"
            if config is not None and method == "wisparse":
                alphas = config.selection.get("block_alphas", [])
                changes = len(config.selection.get("block_changes", []))
                row["alpha"] = f"global {config.selection.get('global_best')}" + (
                    f", {changes} block changes" if alpha_search != "global" else "")
                row["alpha_blocks"] = alphas
                row["alpha_search"] = f"{alpha_search} ({alpha_criterion}" + (
                    f", min_z {alpha_min_z:g})" if alpha_min_z > 0 else ")")
                if alpha_search == "validated":
                    row["alpha"] += f", held-out choice: {config.selection.get('chosen')}"
                row["selection_seconds"] = config.selection.get("seconds")
            cache.put(spec, row)
        log(f"{row['method']:9s} {row['mode']:9s} nominal {row['sparsity_nominal']:.3f} "
            f"realised {row['sparsity_realised']:.3f} ppl {row['ppl']:.3f}")
        rows.append(row)
    return rows
