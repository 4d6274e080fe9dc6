"""Block-by-block calibration: one pass over calibration windows records what every threshold needs.

`BlockRunner` feeds the calibration windows through the decoder one block at a time, keeping only the hidden
states between two blocks alive, so peak memory does not grow with depth.

* `collect_stats` (dense pass): for every projection and every alpha of a grid, a histogram of log2 scores
  |x_j| * c_j**alpha; also per site (shared masks) and of |act(gate)| (CATS). Any target's threshold is then
  read off without another pass.
* `recalibrate_sequential` (optional refinement): recomputes thresholds block by block and site by site with
  everything upstream already sparsified, which removes the drift of dense-pass thresholds at high sparsity.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from wisparse.errors import WisparseError
from wisparse.models.adapters import Adapter, adapter_for
from wisparse.saliency import DEFAULT_ALPHA_GRID, LogHistogram, channel_threshold, column_norms, log2_abs


class _StopForward(Exception):
    pass


class StopBlock(Exception):
    """Raised by a recording hook to end a block's forward early."""


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRunner:
    """Runs decoder blocks one at a time over fixed windows [n, L]."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, adapter: Adapter | None = None) -> None:
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.blocks = self.adapter.blocks(model)
        self.device = next(model.parameters()).device
        self.block_args: list[tuple[tuple, dict]] = [None] * len(self.blocks)
        self.hidden: list[torch.Tensor] = []
        self._capture(windows)

    @torch.no_grad()
    def _capture(self, windows: torch.Tensor) -> None:
        """Record the hidden states entering block 0 for every window, and every block's other arguments."""
        first = True
        last = len(self.blocks) - 1

        def make_hook(index: int):
            def hook(module, args, kwargs):
                if index == 0:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    self.hidden.append(hidden.detach())
                if first:
                    self.block_args[index] = (tuple(args[1:]), {k: v for k, v in kwargs.items()
                                                                 if k != "hidden_states"})
                if not first or index == last:
                    raise _StopForward

            return hook

        handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True)
                   for i, block in enumerate(self.blocks)]
        try:
            for window in windows:
                try:
                    self.model(input_ids=window[None].to(self.device), use_cache=False)
                except _StopForward:
                    pass
                first = False
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.block_args[index]
        return _first_output(self.blocks[index](hidden, *args, **kwargs))

    def run_all(self, index: int) -> None:
        """Run block `index` over every window without keeping the outputs, for hooks that record; a hook may
        raise `StopBlock` once it has what it needs, to skip the rest of the block."""
        for hidden in self.hidden:
            try:
                self.run(index, hidden)
            except StopBlock:
                pass

    def advance(self, index: int) -> None:
        """Replace the stored hidden states by the outputs of block `index`."""
        self.hidden = [self.run(index, hidden) for hidden in self.hidden]


@dataclass
class CalibrationStats:
    """Histograms of log2 scores per projection (and per site) for every alpha of `alpha_grid`."""

    alpha_grid: tuple[float, ...]
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # projection or site -> column norms
    hists: dict[str, dict[float, LogHistogram]] = field(default_factory=dict)  # projection or site -> alpha -> h
    cats: dict[str, LogHistogram] = field(default_factory=dict)  # act(gate) module -> |act| histogram
    tokens: int = 0
    windows: int = 0
    window_len: int = 0
    seconds: float = 0.0

    def threshold(self, key: str, sparsity: float, alpha: float) -> torch.Tensor:
        return channel_threshold(self.hists[key][alpha], sparsity, self.norms[key], alpha)


def site_key(block_prefix: str, site_name: str) -> str:
    return f"{block_prefix}.{site_name}"


def _site_recorder(stats: CalibrationStats, keys: list[str], alphas: dict[str, list[float]], stop: bool = False):
    """A forward pre-hook that adds a site input's log2 scores to the histograms of `keys`."""

    def hook(module, args):
        log2x = log2_abs(args[0])
        for key in keys:
            log2c = stats.norms[key].to(log2x.device).log2()
            for alpha in alphas[key]:
                hist = stats.hists[key].setdefault(alpha, LogHistogram(log2x.device))
                hist.add_log2(log2x + alpha * log2c)
        if stop:
            raise StopBlock

    return hook


def _activation_recorder(hist: LogHistogram, stop: bool = False):
    def hook(module, args, output):
        hist.add_log2(log2_abs(output))
        if stop:
            raise StopBlock

    return hook


def checkpoint_tag(model: nn.Module, windows: torch.Tensor, alpha_grid: tuple[float, ...]) -> dict:
    """What a checkpoint must match to be resumed: the model's shapes and weights, the tokens, the grid."""
    from wisparse.config import model_fingerprint

    fingerprint = model_fingerprint(model)
    return {"shapes": fingerprint["shapes"], "norms": [round(v, 4) for v in fingerprint["weight_norms"].values()],
            "tokens": hashlib.sha256(windows.numpy().tobytes()).hexdigest(), "grid": list(alpha_grid)}


def _save_checkpoint(path: Path, tag: dict, next_block: int, runner: "BlockRunner", stats: CalibrationStats) -> None:
    state = {"tag": tag, "next_block": next_block, "hidden": [h.cpu() for h in runner.hidden],
             "norms": stats.norms, "cats": {k: h.counts for k, h in stats.cats.items()},
             "hists": {k: {a: h.counts for a, h in v.items()} for k, v in stats.hists.items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def _load_checkpoint(path: Path, tag: dict, runner: "BlockRunner", stats: CalibrationStats) -> int:
    """Restore a matching checkpoint into `runner` and `stats`; return the block to continue from (0: none)."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("tag") != tag:
        raise WisparseError(f"calibration checkpoint {path} was made for another model, tokens or alpha grid; "
                            f"delete it or choose another path")
    runner.hidden = [h.to(runner.device) for h in state["hidden"]]
    stats.norms = state["norms"]
    for key, counts in state["cats"].items():
        stats.cats[key] = LogHistogram(runner.device)
        stats.cats[key].counts = counts.to(runner.device)
    for key, by_alpha in state["hists"].items():
        stats.hists[key] = {}
        for alpha, counts in by_alpha.items():
            stats.hists[key][alpha] = LogHistogram(runner.device)
            stats.hists[key][alpha].counts = counts.to(runner.device)
    return state["next_block"]


@torch.no_grad()
def collect_stats(
    model: nn.Module, windows: torch.Tensor, alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
    progress: bool = True, checkpoint: str | Path | None = None, checkpoint_seconds: float = 60.0,
) -> CalibrationStats:
    """The dense calibration pass (see module docstring). `windows` [n, L] are calibration tokens.

    With `checkpoint`, progress is saved there (at most every `checkpoint_seconds`, and at the end) and a rerun
    resumes from the last saved block; a finished checkpoint returns at once.
    """
    start = time.perf_counter()
    adapter = adapter_for(model)
    runner = BlockRunner(model, windows, adapter)
    stats = CalibrationStats(tuple(alpha_grid), tokens=windows.numel(), windows=windows.shape[0],
                             window_len=windows.shape[1])
    grid = list(alpha_grid)
    path = Path(checkpoint) if checkpoint else None
    tag = checkpoint_tag(model, windows, tuple(alpha_grid)) if path else None
    first_block = _load_checkpoint(path, tag, runner, stats) if path else 0
    last_save = time.perf_counter()
    for index, block in enumerate(tqdm(runner.blocks, desc="calibrating", disable=not progress)):
        if index < first_block:
            continue
        prefix = f"{adapter.blocks_path}.{index}"
        handles = []
        for site in adapter.sites:
            names = [f"{prefix}.{p}" for p in site.projections]
            weights = [model.get_submodule(n).weight for n in names]
            key = site_key(prefix, site.name)
            for name, weight in zip(names, weights):
                stats.norms[name] = column_norms([weight])
            keys = list(names)
            if len(names) > 1:  # a shared-mask site; a one-projection site is its projection
                stats.norms[key] = column_norms(weights)
                keys.append(key)
            for k in keys:
                stats.hists[k] = {}
            first = block.get_submodule(site.projections[0])
            handles.append(first.register_forward_pre_hook(_site_recorder(stats, keys, {k: grid for k in keys})))
        act_name = f"{prefix}.{adapter.gate_activation}"
        stats.cats[act_name] = LogHistogram(runner.device)
        recorder = _activation_recorder(stats.cats[act_name])
        handles.append(model.get_submodule(act_name).register_forward_hook(recorder))
        try:
            runner.advance(index)
        finally:
            for handle in handles:
                handle.remove()
        done = index + 1 == len(runner.blocks)
        if path and (done or time.perf_counter() - last_save > checkpoint_seconds):
            _save_checkpoint(path, tag, index + 1, runner, stats)
            last_save = time.perf_counter()
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def recalibrate_sequential(model: nn.Module, config, windows: torch.Tensor, progress: bool = True) -> float:
    """Re-derive every threshold of a sparsified `model` (threshold mode) with upstream sparsity in place.

    Block by block and, inside a block, site by site in forward order: each site's thresholds come from the
    inputs it sees once everything before it is sparsified. Updates the model's modules and `config` in place;
    returns the wall-clock seconds.
    """
    from wisparse.sparsify import cats_activation, sparse_modules

    start = time.perf_counter()
    adapter = adapter_for(model)
    runner = BlockRunner(model, windows, adapter)
    modules = sparse_modules(model)
    for index in tqdm(range(len(runner.blocks)), desc="sequential calibration", disable=not progress):
        prefix = f"{adapter.blocks_path}.{index}"
        names = [f"{prefix}.{p}" for p in adapter.projections]
        act_name = f"{prefix}.{adapter.gate_activation}"
        act = cats_activation(model, act_name)
        for name in names:
            modules[name].set_dense()
        if act is not None:
            act.threshold = 0.0
        for site in adapter.sites:
            site_names = [f"{prefix}.{p}" for p in site.projections]
            settings = [config.projections[n] for n in site_names]
            if config.method == "cats":
                if site.name != "mlp_mid" or act is None:
                    continue
                hist = LogHistogram(runner.device)
                handle = act.register_forward_hook(_activation_recorder(hist, stop=True))
                try:
                    runner.run_all(index)
                finally:
                    handle.remove()
                sparsity = settings[0].sparsity
                act.threshold = float(2.0 ** hist.quantile_log2(sparsity)) if sparsity > 0 else 0.0
                config.cats_thresholds[act_name] = act.threshold
                continue
            if all(s.sparsity == 0 for s in settings):
                continue
            shared = config.share_site_masks and len(site_names) > 1
            keys = [site_key(prefix, site.name)] if shared else site_names
            stats = CalibrationStats(())
            for key, name in zip(keys, site_names):
                members = site_names if shared else [name]
                stats.norms[key] = column_norms([modules[n].weight for n in members])
                stats.hists[key] = {}
            alphas = {key: [config.projections[site_names[0] if shared else key].alpha] for key in keys}
            recorder = _site_recorder(stats, keys, alphas, stop=True)
            handle = modules[site_names[0]].register_forward_pre_hook(recorder)
            try:
                runner.run_all(index)
            finally:
                handle.remove()
            for name in site_names:
                setting = config.projections[name]
                key = keys[0] if shared else name
                setting.threshold = stats.threshold(key, setting.sparsity, setting.alpha).cpu()
                modules[name].set_threshold(setting.threshold)
        runner.advance(index)
    seconds = time.perf_counter() - start
    config.calibration["sequential"] = True
    config.calibration["sequential_seconds"] = round(seconds, 2)
    return seconds
