"""Turning calibration statistics into a SparsityConfig, and applying a config to a model in place.

`sparsify_(model, config)` replaces every projection's `nn.Linear` by a `SparseLinear` sharing its weight (the
model's attention and MLP code stay the library's); CATS wraps the MLP's activation module instead.
`unsparsify_(model)` puts the original modules back.
"""
from __future__ import annotations

import torch
from torch import nn

from wisparse.calibration import CalibrationStats, site_key
from wisparse.config import ProjectionSetting, SparsityConfig, model_fingerprint
from wisparse.errors import WisparseError
from wisparse.models.adapters import adapter_for
from wisparse.saliency import FIXED_ALPHA, check_method, check_sparsity, column_norms, score_scale, topk_keep
from wisparse.sparse_linear import SparseLinear, sparsify_trailing


class ThresholdedActivation(nn.Module):
    """CATS: act(gate) with entries |act(gate)| <= threshold zeroed, which zeroes the down projection's input."""

    def __init__(self, act: nn.Module, threshold: float = 0.0, positions: float = 1.0) -> None:
        super().__init__()
        self.act = act
        self.threshold = threshold
        self.positions = positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(x)
        if self.threshold <= 0:
            return a
        return sparsify_trailing(a, a * (a.abs() > self.threshold), self.positions)


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def cats_activation(model: nn.Module, name: str) -> ThresholdedActivation | None:
    module = model.get_submodule(name)
    return module if isinstance(module, ThresholdedActivation) else None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def uniform_allocation(model: nn.Module, method: str, sparsity: float) -> dict[str, float]:
    """Every projection at `sparsity` (CATS: only the down projections, at the intermediate sparsity)."""
    names = adapter_for(model).projection_names(model)
    if method == "cats":
        return {n: (sparsity if n.endswith("down_proj") else 0.0) for n in names}
    return {n: sparsity for n in names}


def build_config(
    model: nn.Module,
    stats: CalibrationStats | None,
    method: str,
    mode: str,
    sparsities: dict[str, float],
    alphas: dict[str, float] | None = None,
    *,
    target_sparsity: float | None = None,
    allocation: str = "uniform",
    positions: float = 1.0,
    share_site_masks: bool = False,
) -> SparsityConfig:
    """A config for `model`: per-projection sparsities and alphas; thresholds from dense-pass `stats`."""
    check_method(method, mode)
    adapter = adapter_for(model)
    for name, s in sparsities.items():
        check_sparsity(s, f"sparsity of {name}")
    if alphas is None:
        if method not in FIXED_ALPHA and method != "cats":
            raise WisparseError(f"method {method!r} needs per-layer alphas (see wisparse.select_alphas)")
        alphas = {n: FIXED_ALPHA.get(method, 0.0) for n in sparsities}
    fingerprint = model_fingerprint(model)
    numels = {n: fingerprint["shapes"][n][0] * fingerprint["shapes"][n][1] for n in sparsities}
    target = target_sparsity if target_sparsity is not None else (
        sum(numels[n] * s for n, s in sparsities.items()) / sum(numels.values()))
    config = SparsityConfig(method, mode, target, allocation=allocation, positions=positions,
                            share_site_masks=share_site_masks, model=fingerprint)
    needs_stats = mode == "threshold"
    if needs_stats and stats is None:
        raise WisparseError("threshold mode needs calibration statistics")
    for index in range(len(adapter.blocks(model))):
        prefix = f"{adapter.blocks_path}.{index}"
        for site in adapter.sites:
            names = [f"{prefix}.{p}" for p in site.projections]
            shared = share_site_masks and len(names) > 1
            if shared and (len({sparsities[n] for n in names}) > 1 or len({alphas[n] for n in names}) > 1):
                key = site_key(prefix, site.name)
                raise WisparseError(f"shared masks need one sparsity and alpha per site ({key})")
            for name in names:
                setting = ProjectionSetting(sparsities[name], alphas[name])
                if needs_stats and method != "cats" and setting.sparsity > 0:
                    key = site_key(prefix, site.name) if shared else name
                    setting.threshold = stats.threshold(key, setting.sparsity, setting.alpha).cpu()
                config.projections[name] = setting
        if method == "cats":
            act_name = f"{prefix}.{adapter.gate_activation}"
            s = sparsities[f"{prefix}.mlp.down_proj"]
            config.cats_thresholds[act_name] = float(2.0 ** stats.cats[act_name].quantile_log2(s)) if s > 0 else 0.0
    if stats is not None:
        config.calibration.update(tokens=stats.tokens, windows=stats.windows, window_len=stats.window_len,
                                  dense_pass_seconds=round(stats.seconds, 2), sequential=False)
    return config


def _topk_scale(model: nn.Module, config: SparsityConfig, name: str, site_names: list[str]) -> torch.Tensor:
    members = site_names if config.share_site_masks else [name]
    norms = column_norms([model.get_submodule(n).weight for n in members])
    return score_scale(norms, config.projections[name].alpha)


def apply_projection(model: nn.Module, config: SparsityConfig, name: str, site_names: list[str]) -> SparseLinear:
    """Put projection `name` (wrapped in a SparseLinear if needed) into the state `config` gives it."""
    module = model.get_submodule(name)
    if not isinstance(module, SparseLinear):
        module = SparseLinear(module, name)
        _replace(model, name, module)
    module.positions = config.positions
    setting = config.projections.get(name)
    if setting is None:
        raise WisparseError(f"config has no setting for {name}")
    if setting.sparsity == 0 or config.method == "cats":
        module.set_dense()
    elif config.mode == "topk":
        module.set_topk(topk_keep(module.in_features, setting.sparsity), _topk_scale(model, config, name, site_names))
    else:
        if setting.threshold is None:
            raise WisparseError(f"config has no threshold for {name}")
        module.set_threshold(setting.threshold)
    return module


def sparsify_(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Apply `config` to `model` in place (re-applying a config replaces the previous one). Returns the model."""
    config.check_matches(model)
    adapter = adapter_for(model)
    for index in range(len(adapter.blocks(model))):
        prefix = f"{adapter.blocks_path}.{index}"
        for site in adapter.sites:
            site_names = [f"{prefix}.{p}" for p in site.projections]
            for name in site_names:
                apply_projection(model, config, name, site_names)
        act_name = f"{prefix}.{adapter.gate_activation}"
        act = model.get_submodule(act_name)
        if config.method == "cats":
            if not isinstance(act, ThresholdedActivation):
                act = ThresholdedActivation(act)
                _replace(model, act_name, act)
            act.threshold = config.cats_thresholds.get(act_name, 0.0)
            act.positions = config.positions
        elif isinstance(act, ThresholdedActivation):
            _replace(model, act_name, act.act)
    model.sparsity_config = config
    return model


def unsparsify_(model: nn.Module) -> nn.Module:
    """Undo `sparsify_`: the original linear and activation modules, sharing the same weights, are back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            _replace(model, name, module.unwrap())
        elif isinstance(module, ThresholdedActivation):
            _replace(model, name, module.act)
    if hasattr(model, "sparsity_config"):
        del model.sparsity_config
    return model
