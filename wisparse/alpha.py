"""Choosing WiSparse's per-layer alpha on selection text, by what the whole model's output says.

Choosing each layer's alpha by that layer's own reconstruction error was measured to lose to both special cases
(method.md): a layer-local error cannot see how a mask's damage propagates. Here every candidate is scored by
the KL divergence of the sparsified model's next-token distribution from the dense model's, on selection windows
(never evaluation text):

1. global: one alpha for all blocks, every value of the grid (the grid holds TEAL's 0 and WINA's 1, so the
   choice is never worse than either on selection text);
2. block: one sweep over the blocks in forward order, each trying every other alpha of the grid with the rest
   fixed, keeping a change only when the KL falls. A trial of block b reruns only blocks b.. from the cached
   hidden states entering block b (all windows as one batch), and swaps precomputed thresholds: no weight or
   statistics work per trial.
3. validated (an option): the block search on half of the selection windows, then a choice between its result,
   the best global alpha, 0 and 1 by the KL on the other half.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wisparse.calibrate import BlockRunner, CalibrationStats
from wisparse.errors import WisparseError
from wisparse.models.adapters import adapter_for
from wisparse.sparsify import apply_projection, build_config, sparsify_, unsparsify_

SEARCHES = ("global", "block", "validated")


def _kl(log_p: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(p || softmax(logits)) over the tokens of one window."""
    log_q = F.log_softmax(logits.float(), -1)
    log_p = log_p.float()
    kl = (log_p.exp() * (log_p - log_q)).sum()
    if not torch.isfinite(kl):
        raise WisparseError("non-finite (NaN/Inf) logits during alpha selection")
    return float(kl)


@torch.no_grad()
def dense_log_probs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """The dense model's next-token log-probabilities per window, kept in float16 to halve memory."""
    device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=w[None].to(device), use_cache=False).logits[0].float(), -1).half()
            for w in windows]


@torch.no_grad()
def kl_to_dense(model: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(dense || model), running the whole model."""
    device = next(model.parameters()).device
    total = sum(_kl(ref, model(input_ids=w[None].to(device), use_cache=False).logits[0])
                for w, ref in zip(windows, reference))
    return total / windows.numel()


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
    share_site_masks: bool = False,
    positions: float = 1.0,
    progress: bool = True,
) -> tuple[dict[str, float], dict]:
    """Per-projection alphas (one value per block) and a record of the search. `model` must be dense on entry
    and is dense again on return. `windows` are selection tokens."""
    if search not in SEARCHES:
        raise WisparseError(f"unknown alpha search {search!r}; choose one of {', '.join(SEARCHES)}")
    if search == "validated":
        return _validated_search(model, stats, windows, mode, sparsities, grid=grid,
                                 share_site_masks=share_site_masks, positions=positions, progress=progress)
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
    reference = dense_log_probs(model, windows)
    configs = {a: build_config(model, stats, "wisparse", mode, sparsities, {n: a for n in sparsities},
                               share_site_masks=share_site_masks, positions=positions) for a in grid}
    sparsify_(model, configs[grid[0]])
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

    def kl_from(b: int) -> float:
        hidden = runner.hidden[0]
        for i in range(b, n_blocks):
            hidden = runner.run(i, hidden)
        total = sum(_kl(ref, adapter.logits(model, hidden[w: w + 1])[0]) for w, ref in enumerate(reference))
        return total / windows.numel()

    record = {"search": search, "grid": list(grid), "global_kl": {}, "block_changes": [], "evaluations": 0}
    for alpha in tqdm(grid, desc="alpha (global)", disable=not progress):
        for b in range(n_blocks):
            set_block(b, alpha)
        record["global_kl"][str(alpha)] = kl_from(0)
    best_alpha = min(grid, key=lambda a: record["global_kl"][str(a)])
    best_kl = record["global_kl"][str(best_alpha)]
    for b in range(n_blocks):
        set_block(b, best_alpha)
    record["evaluations"] = len(grid)
    if search == "block":
        for b in tqdm(range(n_blocks), desc="alpha (per block)", disable=not progress):
            current = block_alpha[b]
            for alpha in grid:
                if alpha == current:
                    continue
                set_block(b, alpha)
                kl = kl_from(b)
                record["evaluations"] += 1
                if kl < best_kl:
                    best_kl, current = kl, alpha
                    record["block_changes"].append({"block": b, "alpha": alpha, "kl": kl})
            set_block(b, current)
            runner.advance(b)
    unsparsify_(model)
    record.update(global_best=best_alpha, best_kl=best_kl, block_alphas=list(block_alpha),
                  seconds=round(time.perf_counter() - start, 2), tokens=windows.numel())
    alphas = {n: block_alpha[adapter.block_index(n)] for n in sparsities}
    return alphas, record


def _validated_search(model, stats, windows, mode, sparsities, *, grid, share_site_masks, positions, progress):
    """Block search on the first half of the selection windows; then the block-wise result, the best global
    alpha, TEAL's 0 and WINA's 1 compete on the held-out second half, which guards against the sweep fitting
    the noise of the windows it searched on."""
    if len(windows) < 2:
        raise WisparseError("the validated alpha search needs at least 2 selection windows")
    half = len(windows) // 2
    searched, record = select_alphas(model, stats, windows[:half], mode, sparsities, grid=grid, search="block",
                                     share_site_masks=share_site_masks, positions=positions, progress=progress)
    candidates = {"block": searched, "global": {n: record["global_best"] for n in sparsities},
                  "teal": {n: 0.0 for n in sparsities}, "wina": {n: 1.0 for n in sparsities}}
    held_out = windows[half:]
    reference = dense_log_probs(model, held_out)
    scores = {}
    for label, alphas in candidates.items():
        sparsify_(model, build_config(model, stats, "wisparse", mode, sparsities, alphas,
                                      share_site_masks=share_site_masks, positions=positions))
        scores[label] = kl_to_dense(model, held_out, reference)
        unsparsify_(model)
    chosen = min(scores, key=scores.get)
    record.update(search="validated", held_out_kl=scores, chosen=chosen, tokens=windows.numel())
    return candidates[chosen], record
