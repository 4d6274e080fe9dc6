"""SparsityConfig: what to sparsify and how, saved as JSON plus safetensors for the per-channel vectors.

It records the method, mode, per-projection sparsities, alphas and thresholds, where the thresholds came from
(calibration data, token count, timings), the identity of the model it was made for, and the library version.
Loading it into a different model is an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wisparse.errors import WisparseError
from wisparse.models.adapters import adapter_for
from wisparse.saliency import check_method, check_sparsity

FORMAT_VERSION = 1
NORM_RTOL = 2e-2  # bf16 vs fp32 copies of one checkpoint agree far better than this; other checkpoints don't


def library_version() -> str:
    from wisparse import __version__

    return __version__


@dataclass
class ProjectionSetting:
    sparsity: float
    alpha: float = 0.0
    threshold: torch.Tensor | None = None  # [in] per-channel threshold in activation units (threshold mode)


@dataclass
class SparsityConfig:
    method: str
    mode: str
    target_sparsity: float
    allocation: str = "uniform"
    positions: float = 1.0  # fraction of trailing positions of each sequence that are sparsified
    share_site_masks: bool = False
    projections: dict[str, ProjectionSetting] = field(default_factory=dict)
    cats_thresholds: dict[str, float] = field(default_factory=dict)  # act(gate) module -> |act| threshold
    model: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        check_method(self.method, self.mode)
        check_sparsity(self.target_sparsity, "target sparsity")
        if not 0.0 < self.positions <= 1.0:
            raise WisparseError(f"positions must be in (0, 1], got {self.positions!r}")

    def save(self, path: str | Path) -> Path:
        """Write `path` (.json) and, when there are thresholds, the .safetensors beside it."""
        path = Path(path).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: s.threshold.detach().float().cpu().contiguous()
                   for name, s in self.projections.items() if s.threshold is not None}
        record = asdict(self)
        record["format"] = FORMAT_VERSION
        record["version"] = self.version or library_version()
        record["projections"] = {name: {"sparsity": s.sparsity, "alpha": s.alpha} for name, s in
                                 self.projections.items()}
        record["thresholds_file"] = path.with_suffix(".safetensors").name if tensors else None
        if tensors:
            save_file(tensors, str(path.with_suffix(".safetensors")))
        path.write_text(json.dumps(record, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SparsityConfig":
        path = Path(path)
        if not path.exists():
            raise WisparseError(f"config file not found: {path}")
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise WisparseError(f"{path} is not a wisparse config (invalid JSON: {err.msg})") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
            raise WisparseError(f"{path} is not a wisparse config of format {FORMAT_VERSION}")
        tensors = {}
        if record.get("thresholds_file"):
            tensors_path = path.with_name(record["thresholds_file"])
            if not tensors_path.exists():
                raise WisparseError(f"the thresholds file {tensors_path} named by {path} is missing")
            tensors = load_file(str(tensors_path))
        projections = {name: ProjectionSetting(p["sparsity"], p["alpha"], tensors.get(name))
                       for name, p in record["projections"].items()}
        known = {f.name for f in dataclasses.fields(cls)} - {"projections"}
        return cls(projections=projections, **{k: v for k, v in record.items() if k in known})

    def check_matches(self, model: nn.Module) -> None:
        """Raise if this config was made for another model (architecture, shapes, or weights)."""
        mine, theirs = self.model, model_fingerprint(model)
        for key in ("model_type", "num_layers"):
            if mine.get(key) != theirs[key]:
                raise WisparseError(f"config is for another model: {key} {mine.get(key)!r} != {theirs[key]!r}")
        if mine.get("shapes") != theirs["shapes"]:
            raise WisparseError("config is for another model: projection shapes differ")
        for name, norm in mine.get("weight_norms", {}).items():
            if not math.isclose(norm, theirs["weight_norms"][name], rel_tol=NORM_RTOL):
                raise WisparseError(f"config is for another model: the weights of {name} differ")

    def model_sparsity(self, numels: dict[str, int]) -> float:
        """Nominal parameter-weighted sparsity over the model's projections."""
        total = sum(numels.values())
        return sum(numels[name] * s.sparsity for name, s in self.projections.items()) / total


def projection_modules(model: nn.Module) -> dict[str, nn.Module]:
    adapter = adapter_for(model)
    return {name: model.get_submodule(name) for name in adapter.projection_names(model)}


def projection_numels(model: nn.Module) -> dict[str, int]:
    """Parameter count of every projection, read from the modules (GQA makes k/v smaller)."""
    return {name: module.weight.numel() for name, module in projection_modules(model).items()}


def model_fingerprint(model: nn.Module) -> dict:
    modules = projection_modules(model)
    return {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "num_layers": len(adapter_for(model).blocks(model)),
        "shapes": {name: list(m.weight.shape) for name, m in modules.items()},
        "weight_norms": {name: float(m.weight.detach().float().norm()) for name, m in modules.items()},
    }
