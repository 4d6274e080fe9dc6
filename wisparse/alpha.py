"""Choosing WiSparse's per-layer alpha on selection text, by what the whole model's output says.

Choosing each layer's alpha by that layer's own reconstruction error was measured to lose to both special cases
(method.md): a layer-local error cannot see how a mask's damage propagates. Here every candidate is scored by the
whole sparsified model on selection windows (never evaluation text), by one of two criteria:

- kl (default): the KL divergence of the sparsified model's next-token distribution from the dense model's. It
  compares whole distributions at every position, so it is far less noisy than the NLL;
- nll: the mean next-token negative log-likelihood of the selection text (the log of its perplexity). It scores
  only the one observed token per position; on the H200 table it chose worse alphas than kl at most levels
  (benchmarks/results/ppl_smollm2_selector_history.md).

The searches:

1. global: one alpha for all blocks, every value of the grid (the grid holds TEAL's 0 and WINA's 1, so the
   choice is never worse than either on selection text);
2. block: one sweep over the blocks in forward order, each trying the grid's neighbours (block_steps grid steps
   either side, default 1) of the best global alpha with the rest fixed, keeping a change only when the loss
   falls. Few, local trials per block: trying the whole grid at every block fitted the noise of the selection
   windows (30 blocks x 6 trials of near-equal loss). With min_z > 0 a change must also lower the loss by at
   least min_z standard errors of its paired per-window differences. A trial of block b reruns only blocks b..
   from the cached hidden states entering block b (all windows as one batch), and swaps precomputed thresholds:
   no weight or statistics work per trial.
3. validated (an option): the block search on half of the selection windows, then a choice between its result,
   the best global alpha, 0 and 1 by the loss on the other half.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wisparse.calibration import BlockRunner, CalibrationStats, checkpoint_tag
from wisparse.errors import WisparseError
from wisparse.models.adapters import adapter_for
from wisparse.sparsify import apply_projection, build_config, sparsify_, unsparsify_

SEARCHES = ("global", "block", "validated")
CRITERIA = ("nll", "kl")


def check_alpha_selector(search: str | None = None, criterion: str | None = None) -> None:
    """A clear error for an unknown search or criterion name (each checked when given)."""
    if search is not None and search not in SEARCHES:
        raise WisparseError(f"unknown alpha search {search!r}; choose one of {', '.join(SEARCHES)}")
    if criterion is not None and criterion not in CRITERIA:
        raise WisparseError(f"unknown alpha criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _window_loss(criterion: str, window: torch.Tensor, reference: torch.Tensor | None, logits: torch.Tensor) -> float:
    """Summed loss over the tokens of one window: KL(dense || softmax(logits)), or the NLL of the window's
    next tokens."""
    logits = logits.float()
    if criterion == "kl":
        log_p = reference.float()
        loss = (log_p.exp() * (log_p - F.log_softmax(logits, -1))).sum()
    else:
        loss = F.cross_entropy(logits[:-1], window[1:].to(logits.device), reduction="sum")
    if not torch.isfinite(loss):
        raise WisparseError("non-finite (NaN/Inf) logits during alpha selection")
    return float(loss)


def _scored_tokens(criterion: str, windows: torch.Tensor) -> int:
    return windows.numel() - (len(windows) if criterion == "nll" else 0)


@torch.no_grad()
def dense_reference(model: nn.Module, windows: torch.Tensor, criterion: str) -> list[torch.Tensor | None]:
    """What the criterion compares against: the dense model's next-token log-probabilities per window (kl, kept
    in float16 to halve memory), or nothing (nll compares with the text itself)."""
    check_alpha_selector(criterion=criterion)
    if criterion == "nll":
        return [None] * len(windows)
    device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=w[None].to(device), use_cache=False).logits[0].float(), -1).half()
            for w in windows]


@torch.no_grad()
def selection_loss(model: nn.Module, windows: torch.Tensor, criterion: str,
                   reference: list[torch.Tensor | None]) -> float:
    """Mean per-token loss of the whole model (as it is now, dense or sparsified) on `windows`."""
    device = next(model.parameters()).device
    total = sum(_window_loss(criterion, w, ref, model(input_ids=w[None].to(device), use_cache=False).logits[0])
                for w, ref in zip(windows, reference, strict=True))
    return total / _scored_tokens(criterion, windows)


@torch.no_grad()
def select_alphas(
    model: nn.Module,
    stats: CalibrationStats | None,
    windows: torch.Tensor,
    mode: str,
    sparsities: dict[str, float],
    *,
    grid: tuple[float, ...] | None = None,
    search: str = "block",
    criterion: str = "kl",
    block_steps: int = 1,
    min_z: float = 0.0,
    share_site_masks: bool = False,
    positions: float = 1.0,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], dict]:
    """Per-projection alphas (one value per block) and a record of the search. `model` must be dense on entry
    and is dense again on return. `windows` are selection tokens. With `checkpoint` (a JSON path) the search
    saves its state after every global candidate and every block, and a rerun resumes from there."""
    check_alpha_selector(search, criterion)
    if min_z > 0 and len(windows) < (4 if search == "validated" else 2):
        raise WisparseError("min_z > 0 compares per-window losses: give at least 2 selection windows per search")
    if search == "validated":
        return _validated_search(model, stats, windows, mode, sparsities, grid=grid, criterion=criterion,
                                 block_steps=block_steps, min_z=min_z, share_site_masks=share_site_masks,
                                 positions=positions, checkpoint=checkpoint, progress=progress)
    if grid is None:
        if stats is None:
            raise WisparseError("give an alpha grid or calibration statistics")
        grid = stats.alpha_grid
    grid = tuple(grid)
    if stats is not None and mode == "threshold" and not set(grid) <= set(stats.alpha_grid):
        raise WisparseError(f"alpha grid {grid} is not covered by the calibration statistics {stats.alpha_grid}")
    start = time.perf_counter()
    adapter = adapter_for(model)
    n_blocks = len(adapter.blocks(model))
    reference = dense_reference(model, windows, criterion)
    configs = {a: build_config(model, stats, "wisparse", mode, sparsities, {n: a for n in sparsities},
                               share_site_masks=share_site_masks, positions=positions) for a in grid}
    path = Path(checkpoint) if checkpoint else None
    tag = _search_tag(model, windows, grid, mode, sparsities, search, criterion, block_steps, min_z,
                      share_site_masks, positions) if path else None
    saved = _load_search(path, tag) if path else {}
    sparsify_(model, configs[grid[0]])
    try:  # the model is dense again on return, also when interrupted
        site_of = {}
        for b in range(n_blocks):
            for site in adapter.sites:
                names = [f"{adapter.blocks_path}.{b}.{p}" for p in site.projections]
                site_of.update({n: names for n in names})
        names_of_block = [[n for n in sparsities if adapter.block_index(n) == b] for b in range(n_blocks)]
        block_alpha = [grid[0]] * n_blocks

        def set_block(b: int, alpha: float) -> None:
            block_alpha[b] = alpha
            for name in names_of_block[b]:
                apply_projection(model, configs[alpha], name, site_of[name])

        runner = BlockRunner(model, windows, adapter)  # holds the hidden states entering the current block
        # All selection windows go through each block as one batch (the captured block arguments broadcast over the
        # batch): a trial is n_blocks - b launches of each kernel, not n_windows times that.
        runner.hidden = [torch.cat(runner.hidden)]

        def window_losses_from(b: int) -> list[float]:
            """Per-window mean loss with blocks b.. rerun (windows are equally long: their mean is the loss)."""
            hidden = runner.hidden[0]
            for i in range(b, n_blocks):
                hidden = runner.run(i, hidden)
            per_window = _scored_tokens(criterion, windows) / len(windows)
            return [_window_loss(criterion, windows[w], ref, adapter.logits(model, hidden[w: w + 1])[0]) / per_window
                    for w, ref in enumerate(reference)]

        record = {"search": search, "criterion": criterion, "block_steps": block_steps, "min_z": min_z,
                  "grid": list(grid), "global_loss": {}, "global_window_losses": {}, "block_changes": [],
                  "evaluations": 0}
        record["global_loss"].update(saved.get("global_loss", {}))
        record["global_window_losses"].update(saved.get("global_window_losses", {}))
        for alpha in tqdm(grid, desc="alpha (global)", disable=not progress):
            if str(alpha) in record["global_loss"]:
                continue
            for b in range(n_blocks):
                set_block(b, alpha)
            losses = window_losses_from(0)
            record["global_window_losses"][str(alpha)] = losses
            record["global_loss"][str(alpha)] = sum(losses) / len(losses)
            if path:
                _save_search(path, tag, record, block_alpha, 0)
        best_alpha = min(grid, key=lambda a: record["global_loss"][str(a)])
        best_loss = record["global_loss"][str(best_alpha)]
        best_windows = record["global_window_losses"][str(best_alpha)]
        for b in range(n_blocks):
            set_block(b, best_alpha)
        record["evaluations"] = len(grid)
        if search == "block":
            at = grid.index(best_alpha)
            trials = [a for a in grid[max(0, at - block_steps): at + block_steps + 1] if a != best_alpha]
            blocks_done = saved.get("blocks_done", 0)
            if blocks_done:
                best_loss, best_windows = saved["best_loss"], saved["best_window_losses"]
                record["block_changes"] = saved["block_changes"]
                record["evaluations"] = saved["evaluations"]
            for b in tqdm(range(n_blocks), desc="alpha (per block)", disable=not progress):
                if b < blocks_done:  # searched before the interruption: replay its choice
                    set_block(b, saved["block_alpha"][b])
                    runner.advance(b)
                    continue
                current = block_alpha[b]
                for alpha in trials:
                    set_block(b, alpha)
                    losses = window_losses_from(b)
                    record["evaluations"] += 1
                    if _clearly_lower(losses, best_windows, min_z):
                        best_loss, best_windows, current = sum(losses) / len(losses), losses, alpha
                        record["block_changes"].append({"block": b, "alpha": alpha, "loss": best_loss})
                set_block(b, current)
                runner.advance(b)
                if path:
                    _save_search(path, tag, dict(record, best_loss=best_loss, best_window_losses=best_windows),
                                 block_alpha, b + 1)
    finally:
        unsparsify_(model)
    record.update(global_best=best_alpha, best_loss=best_loss, block_alphas=list(block_alpha),
                  seconds=round(time.perf_counter() - start, 2), tokens=windows.numel())
    alphas = {n: block_alpha[adapter.block_index(n)] for n in sparsities}
    return alphas, record


def _clearly_lower(candidate: list[float], current: list[float], min_z: float) -> bool:
    """Whether the candidate's per-window losses are lower than the current ones: on the mean, and with
    min_z > 0 by at least min_z standard errors of the paired per-window differences (a change the selection
    windows cannot tell from noise is not taken)."""
    gains = torch.tensor(current, dtype=torch.float64) - torch.tensor(candidate, dtype=torch.float64)
    if gains.mean() <= 0:
        return False
    if min_z <= 0:
        return True
    return bool(gains.mean() > min_z * gains.std() / len(gains) ** 0.5)


def _search_tag(model, windows, grid, mode, sparsities, search, criterion, block_steps, min_z, share_site_masks,
                positions) -> dict:
    """What an alpha-search checkpoint must match to be resumed."""
    levels = hashlib.sha256(json.dumps(sorted(sparsities.items())).encode()).hexdigest()
    return dict(checkpoint_tag(model, windows, tuple(grid)), mode=mode, levels=levels, search=search,
                criterion=criterion, block_steps=block_steps, min_z=min_z, share_site_masks=share_site_masks,
                positions=positions)


def _save_search(path: Path, tag: dict, record: dict, block_alpha: list[float], blocks_done: int) -> None:
    state = {"tag": tag, "global_loss": record["global_loss"], "block_alpha": block_alpha,
             "blocks_done": blocks_done, "best_loss": record.get("best_loss"),
             "best_window_losses": record.get("best_window_losses"),
             "global_window_losses": record["global_window_losses"],
             "block_changes": record["block_changes"], "evaluations": record["evaluations"]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def _load_search(path: Path, tag: dict) -> dict:
    if not path.exists():
        return {}
    state = json.loads(path.read_text())
    if state.get("tag") != json.loads(json.dumps(tag)):
        raise WisparseError(f"alpha-search checkpoint {path} was made for another model, tokens or setting; "
                            f"delete it or choose another path")
    return state


def _validated_search(model, stats, windows, mode, sparsities, *, grid, criterion, block_steps, min_z,
                      share_site_masks, positions, checkpoint, progress):
    """Block search on the first half of the selection windows; then the block-wise result, the best global
    alpha, TEAL's 0 and WINA's 1 compete on the held-out second half, which guards against the sweep fitting
    the noise of the windows it searched on."""
    if len(windows) < 2:
        raise WisparseError("the validated alpha search needs at least 2 selection windows")
    half = len(windows) // 2
    searched, record = select_alphas(model, stats, windows[:half], mode, sparsities, grid=grid, search="block",
                                     criterion=criterion, block_steps=block_steps, min_z=min_z,
                                     share_site_masks=share_site_masks, positions=positions, checkpoint=checkpoint,
                                     progress=progress)
    candidates = {"block": searched, "global": {n: record["global_best"] for n in sparsities},
                  "teal": {n: 0.0 for n in sparsities}, "wina": {n: 1.0 for n in sparsities}}
    held_out = windows[half:]
    reference = dense_reference(model, held_out, criterion)
    scores = {}
    for label, alphas in candidates.items():
        sparsify_(model, build_config(model, stats, "wisparse", mode, sparsities, alphas,
                                      share_site_masks=share_site_masks, positions=positions))
        scores[label] = selection_loss(model, held_out, criterion, reference)
        unsparsify_(model)
    chosen = min(scores, key=scores.get)
    record.update(search="validated", held_out_loss=scores, chosen=chosen, tokens=windows.numel())
    return candidates[chosen], record
