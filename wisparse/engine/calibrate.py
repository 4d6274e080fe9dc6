"""Thresholds for random-weight speed measurements, calibrated on the same model's decode activations.

For real models the thresholds come from the accuracy path (`wisparse.sparsify_`); a random-weight model has no
data, so this calibrates per-projection weight-aware thresholds (score |x_j| * ||W[:, j]||^alpha, folded into a
per-channel vector t_j = tau / ||W[:, j]||^alpha) on decode tokens of random prompts, so that the realised decode
sparsity matches the nominal level. Two passes: the second sees the activations of the already-sparse model.
"""
from __future__ import annotations

import torch

from .model import GROUPS, Decoder


def uniform_levels(dec: Decoder, level: float) -> dict[tuple[int, str], list[float]]:
    return {(i, g): [level] * len(grp.widths) for i, g, grp in dec.groups()}


def nonuniform_levels(dec: Decoder, mean: float = 0.5, spread: float = 0.2, seed: int = 0
                      ) -> dict[tuple[int, str], list[float]]:
    """Per-block levels from mean-spread to mean+spread (a fixed shuffle), projections differing inside each block
    (offsets re-centred so each block's parameter-weighted mean is its level)."""
    n = len(dec.layers)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.linspace(mean - spread, mean + spread, n)[torch.randperm(n, generator=g)].tolist()
    offsets = {"qkv": [0.06, -0.08, -0.04], "o": [0.04], "gu": [-0.05, 0.03], "down": [0.05]}
    counts = dec.param_counts()
    out = {}
    for i in range(n):
        numel = sum(sum(counts[(i, gname)]) for gname in GROUPS)
        shift = sum(o * c for gname in GROUPS for o, c in zip(offsets[gname], counts[(i, gname)])) / numel
        for gname in GROUPS:
            out[(i, gname)] = [min(0.95, max(0.0, blocks[i] + o - shift)) for o in offsets[gname]]
    return out


def weighted_mean(dec: Decoder, values: dict[tuple[int, str], list[float]]) -> float:
    counts = dec.param_counts()
    num = sum(v * c for k, vs in values.items() for v, c in zip(vs, counts[k]))
    return num / sum(sum(c) for c in counts.values())


@torch.no_grad()
def _collect(dec: Decoder, prompts: torch.Tensor, steps: int) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs x [tokens, K] of every group over `steps` eager decode steps after each prompt's prefill."""
    from .generate import GraphGenerator

    acts: dict[tuple[int, str], list[torch.Tensor]] = {}
    dec.hook = lambda i, g, x: acts.setdefault((i, g), []).append(x.detach().float())
    try:
        gen = GraphGenerator(dec, batch=prompts.shape[0], max_len=prompts.shape[1] + steps + 1,
                             max_new_tokens=steps + 1, use_graph=False)
        gen.prefill(prompts)
        gen.decode(steps)
    finally:
        dec.hook = None
    return {k: torch.cat(v) for k, v in acts.items()}


@torch.no_grad()
def calibrate(dec: Decoder, levels: dict[tuple[int, str], list[float]], alpha: float = 0.5, n_prompts: int = 4,
              prompt_len: int = 64, steps: int = 32, passes: int = 2, seed: int = 1234
              ) -> dict[tuple[int, str], torch.Tensor]:
    """Per-projection thresholds [P, K] (per-channel vectors) for the given levels; installs them in `dec`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    prompts = torch.randint(0, dec.V, (n_prompts, prompt_len), generator=g).to(dec.device)
    norms = {(i, gn): torch.stack([grp.view(p).float().norm(dim=0) for p in range(len(grp.widths))])
             for i, gn, grp in dec.groups()}
    # start dense
    dense = {(i, gn): torch.full_like(grp.t, -1.0) for i, gn, grp in dec.groups()}
    dec.set_thresholds(dense)
    dec.sparse = True
    out = dense
    for _ in range(passes):
        acts = _collect(dec, prompts, steps)
        out = {}
        for key, x in acts.items():
            scale = norms[key].clamp_min(1e-12) ** alpha  # [P, K]
            rows = []
            for p, lvl in enumerate(levels[key]):
                if lvl <= 0:
                    rows.append(torch.full_like(scale[p], -1.0))
                    continue
                s = (x.abs() * scale[p]).flatten()
                k = max(1, min(s.numel(), int(round(lvl * s.numel()))))
                tau = s.kthvalue(k).values
                rows.append(tau / scale[p])
            out[key] = torch.stack(rows)
        dec.set_thresholds(out)
    return out


def realised(dec: Decoder, meter: torch.Tensor, tokens: int) -> dict:
    """From a meter of dropped-channel counts over `tokens` token-rows: per-projection and weighted sparsity."""
    counts = dec.param_counts()
    per = {}
    for i, gn, grp in dec.groups():
        K = grp.wt.shape[0]
        per[(i, gn)] = [float(meter[i, list(GROUPS).index(gn), p]) / (tokens * K) if grp.sparse else 0.0
                        for p in range(len(grp.widths))]
    return {"weighted": weighted_mean(dec, per),
            "by_group": {gn: sum(sum(v * c for v, c in zip(per[(i, gn)], counts[(i, gn)])) for i in range(len(dec.layers)))
                         / sum(sum(counts[(i, gn)]) for i in range(len(dec.layers))) for gn in GROUPS},
            "min_projection": min(min(v) for v in per.values())}
