"""wisparse: training-free, weight-aware activation sparsity for faster LLM decoding.

Pipeline: model -> calibration statistics -> scores and thresholds -> allocation -> config -> sparse modules.

    model, tokenizer = wisparse.load_model()                       # built-in SmolLM2-135M-Instruct
    config = wisparse.calibrate(model, tokenizer, method="wisparse", sparsity=0.5, data_dir="../shared/data")
    config.save("smollm2-50.json")
    wisparse.sparsify_(model, config)                              # in place; wisparse.unsparsify_ undoes it
"""
from __future__ import annotations

__version__ = "0.1.0"

import torch
from torch import nn

from wisparse.alpha import check_alpha_selector, select_alphas
from wisparse.calibration import CalibrationStats, collect_stats, recalibrate_sequential
from wisparse.config import SparsityConfig, projection_numels
from wisparse.data import role_windows
from wisparse.errors import WisparseError
from wisparse.eval.perplexity import perplexity
from wisparse.eval.sparsity import SparsityMeter
from wisparse.models import adapter_for, load_model
from wisparse.saliency import DEFAULT_ALPHA_GRID, FIXED_ALPHA, check_method, check_sparsity
from wisparse.sparse_linear import SparseLinear
from wisparse.sparsify import build_config, sparsify_, uniform_allocation, unsparsify_


def bos_id(model: nn.Module, tokenizer) -> int | None:
    """The BOS to prepend per window, for families whose tokenizer adds one (Gemma)."""
    return tokenizer.bos_token_id if adapter_for(model).bos_per_window else None


def calibrate(
    model: nn.Module,
    tokenizer,
    method: str = "wisparse",
    sparsity: float = 0.5,
    mode: str = "threshold",
    *,
    data_dir: str | None = None,
    calib_windows: int = 16,
    window_len: int = 2048,
    selection_windows: int = 4,
    selection_len: int | None = None,
    alpha_search: str = "block",
    alpha_criterion: str = "kl",
    alpha_min_z: float = 0.0,
    sequential: bool = True,
    share_site_masks: bool = False,
    positions: float = 1.0,
    stats: CalibrationStats | None = None,
    calib_tokens: torch.Tensor | None = None,
    selection_tokens: torch.Tensor | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
) -> SparsityConfig:
    """Calibrate a uniform-allocation config on WikiText-2 train text; `model` is left dense.

    Calibration windows (thresholds) and selection windows (alpha) are disjoint slices of the train text.
    Pass `stats` from `collect_stats` (and the token windows) to reuse one dense pass across methods and levels;
    `checkpoint` (a file path) makes the dense pass resumable, and wisparse's alpha search (saved beside it, one
    file per mode and level).
    """
    check_method(method, mode)
    check_sparsity(sparsity)
    check_alpha_selector(alpha_search, alpha_criterion)
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        unsparsify_(model)
    bos = bos_id(model, tokenizer)
    thresholds = mode == "threshold"  # top-k mode needs no calibration data, only selection data for wisparse
    calib = calib_tokens
    if thresholds and calib is None:
        calib = role_windows("calibration", tokenizer, window_len, calib_windows, data_dir, bos)
    if thresholds and stats is None:
        stats = collect_stats(model, calib, progress=progress, checkpoint=checkpoint)
    sparsities = uniform_allocation(model, method, sparsity)
    alphas, record = None, {}
    if method == "wisparse":
        selection = selection_tokens
        if selection is None:
            selection = role_windows("selection", tokenizer, selection_len or window_len, selection_windows,
                                     data_dir, bos)
        alpha_checkpoint = f"{checkpoint}.alpha-{mode}-{sparsity:g}.json" if checkpoint else None
        alphas, record = select_alphas(model, stats if thresholds else None, selection, mode, sparsities,
                                       grid=stats.alpha_grid if thresholds else DEFAULT_ALPHA_GRID,
                                       search=alpha_search, criterion=alpha_criterion, min_z=alpha_min_z,
                                       share_site_masks=share_site_masks, positions=positions,
                                       checkpoint=alpha_checkpoint,
                                       progress=progress)
    config = build_config(model, stats if thresholds else None, method, mode, sparsities, alphas,
                          target_sparsity=sparsity if method != "cats" else None, positions=positions,
                          share_site_masks=share_site_masks)
    config.selection = record
    if thresholds:
        config.calibration.update(dataset="wikitext2-train (calibration slice)", windows=calib.shape[0],
                                  window_len=calib.shape[1], tokens=calib.numel(),
                                  dense_pass_seconds=round(stats.seconds, 2))
    else:
        config.calibration.update(tokens=0)
    if method == "wisparse":
        config.calibration["selection_tokens"] = selection.numel()
    if sequential and thresholds:
        sparsify_(model, config)
        recalibrate_sequential(model, config, calib, progress=progress)
        unsparsify_(model)
    return config


__all__ = [
    "CalibrationStats", "SparsityConfig", "SparsityMeter", "WisparseError", "build_config", "calibrate",
    "collect_stats", "load_model", "perplexity", "projection_numels", "recalibrate_sequential", "role_windows",
    "select_alphas", "sparsify_", "uniform_allocation", "unsparsify_", "FIXED_ALPHA",
]
