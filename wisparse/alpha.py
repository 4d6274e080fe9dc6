"""Choosing WiSparse's per-layer alpha on selection text, by what the whole model's output says.

Choosing each layer's alpha by that layer's own reconstruction error was measured to lose to both special cases
(method.md): a layer-local error cannot see how a mask's damage propagates. Here every candidate is scored by
the KL divergence of the sparsified model's next-token distribution from the dense model's, on selection windows
(never evaluation text):

1. global: one alpha for all blocks, every value of the grid (so the result is never worse than TEAL's alpha=0
   or WINA's alpha=1 on selection text, both being in the grid);
2. block: one sweep over the blocks, each trying every other alpha of the grid with the rest fixed, keeping a
   change only when the KL falls.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wisparse.calibrate import CalibrationStats
from wisparse.errors import WisparseError
from wisparse.models.adapters import adapter_for
from wisparse.sparsify import build_config, sparsify_, unsparsify_

SEARCHES = ("global", "block")


@torch.no_grad()
def dense_log_probs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """The dense model's next-token log-probabilities per window, kept in float16 to halve memory."""
    device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=w[None].to(device), use_cache=False).logits[0].float(), -1).half()
            for w in windows]


@torch.no_grad()
def kl_to_dense(model: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(dense || sparse)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for window, ref in zip(windows, reference):
        log_q = F.log_softmax(model(input_ids=window[None].to(device), use_cache=False).logits[0].float(), -1)
        log_p = ref.float()
        kl = (log_p.exp() * (log_p - log_q)).sum()
        if not torch.isfinite(kl):
            raise WisparseError("non-finite (NaN/Inf) logits during alpha selection")
        total += float(kl)
        tokens += window.numel()
    return total / tokens


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
    grid = tuple(grid if grid is not None else stats.alpha_grid)
    if stats is not None and mode == "threshold" and not set(grid) <= set(stats.alpha_grid):
        raise WisparseError(f"alpha grid {grid} is not covered by the calibration statistics {stats.alpha_grid}")
    start = time.perf_counter()
    adapter = adapter_for(model)
    n_blocks = len(adapter.blocks(model))
    block_alpha = [grid[0]] * n_blocks
    reference = dense_log_probs(model, windows)

    def evaluate() -> float:
        alphas = {n: block_alpha[adapter.block_index(n)] for n in sparsities}
        config = build_config(model, stats, "wisparse", mode, sparsities, alphas,
                              share_site_masks=share_site_masks, positions=positions)
        sparsify_(model, config)
        return kl_to_dense(model, windows, reference)

    record = {"search": search, "grid": list(grid), "global_kl": {}, "block_changes": [], "evaluations": 0}
    for alpha in tqdm(grid, desc="alpha (global)", disable=not progress):
        block_alpha = [alpha] * n_blocks
        record["global_kl"][str(alpha)] = evaluate()
    best_alpha = min(grid, key=lambda a: record["global_kl"][str(a)])
    best_kl = record["global_kl"][str(best_alpha)]
    block_alpha = [best_alpha] * n_blocks
    record["evaluations"] = len(grid)
    if search == "block":
        for index in tqdm(range(n_blocks), desc="alpha (per block)", disable=not progress):
            current = block_alpha[index]
            for alpha in grid:
                if alpha == current:
                    continue
                block_alpha[index] = alpha
                kl = evaluate()
                record["evaluations"] += 1
                if kl < best_kl:
                    best_kl, current = kl, alpha
                    record["block_changes"].append({"block": index, "alpha": alpha, "kl": kl})
            block_alpha[index] = current
    unsparsify_(model)
    record.update(global_best=best_alpha, best_kl=best_kl, block_alphas=block_alpha,
                  seconds=round(time.perf_counter() - start, 2), tokens=windows.numel())
    alphas = {n: block_alpha[adapter.block_index(n)] for n in sparsities}
    return alphas, record
