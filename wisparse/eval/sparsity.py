"""Realised sparsity: the fraction of input channels actually zeroed, measured on whatever text runs through.

Counted per projection on the sparsified positions only, then aggregated per projection type, per site and over
the whole model, parameter-weighted by each module's `numel()`.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from wisparse.models.adapters import adapter_for
from wisparse.sparse_linear import SparseLinear, sparsified_positions


class SparsityMeter:
    """Context manager: `with SparsityMeter(model) as meter: model(...)`, then `meter.report()`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.zeros: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}

    def _count(self, module: SparseLinear, x: torch.Tensor, sparse: torch.Tensor) -> None:
        if sparse.dim() >= 2:
            n = sparsified_positions(sparse.shape[-2], module.positions)
            sparse = sparse[..., sparse.shape[-2] - n:, :]
        self.zeros[module.name] += int((sparse == 0).sum())
        self.total[module.name] += sparse.numel()

    def __enter__(self) -> "SparsityMeter":
        for module in self.modules.values():
            module.meter = self._count
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            module.meter = None

    def report(self) -> dict:
        """{"model": s, "by_site": {...}, "by_type": {...}, "by_projection": {fqn: s}}; empty when nothing ran."""
        if not self.total:
            return {}
        adapter = adapter_for(self.model)
        by_projection = {n: self.zeros[n] / self.total[n] for n in self.total}
        numel = {n: self.modules[n].weight.numel() for n in by_projection}
        site_of = {p.rsplit(".", 1)[-1]: site.name for site in adapter.sites for p in site.projections}

        def weighted(group_of) -> dict[str, float]:
            num, den = defaultdict(float), defaultdict(float)
            for name, s in by_projection.items():
                group = group_of(name)
                num[group] += numel[name] * s
                den[group] += numel[name]
            return {g: num[g] / den[g] for g in num}

        proj_type = lambda name: name.rsplit(".", 1)[-1]  # noqa: E731
        return {
            "model": weighted(lambda name: "model")["model"],
            "by_site": weighted(lambda name: site_of[proj_type(name)]),
            "by_type": weighted(proj_type),
            "by_projection": by_projection,
        }
