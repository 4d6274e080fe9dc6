"""`torch.ops.wisparse.sparse_gemv`: the sparse GEMV as a PyTorch custom op.

Registered with `torch.library.triton_op` when Triton is importable (so `torch.compile(fullgraph=True)` sees the
Triton kernel itself), else with `torch.library.custom_op` + a fake implementation. On CPU tensors (or without
Triton) it runs the pure-PyTorch reference with the same split-K partial layout, so shapes and semantics agree
everywhere.

    sparse_gemv(x [B, K], wt [K, N], t [P, K] fp32, widths [P], dense) -> fp32 partials [S, B, N]
    sparse_linear(x, wt, t, widths, dense, bias) -> y [B, N] in x.dtype (partials summed, bias added)
    gemv_list(idx, xv, cnt, wt, widths, config) -> fp32 partials [S, 1, N] from precomputed survivor lists (batch 1;
                                                   the decode engine, whose producer kernels write the lists)

With a `listed` configuration (batch 1, sparse), the op compacts x's survivors first (one small launch) and then
walks the lists; S is then ceil(K / kr) * split (`num_splits`).
"""
from __future__ import annotations

import math

import torch

from .sparse_gemv import (
    HAVE_TRITON,
    GemvConfig,
    default_config,
    is_listed,
    launch_gemv_list,
    launch_sparse_gemv,
    num_splits,
    reference_compact,
    reference_gemv_list,
)

# Tuned launch configurations by (K, N, B); filled by `set_config` (the benchmark's sweep), by `install_tuned` (the
# shipped table of a GPU generation) or left to the heuristic.
_CONFIGS: dict[tuple[int, int, int, bool], GemvConfig] = {}
# Shipped tables by compute capability: measured on an H200 (benchmarks/loop_tuned_configs.py writes it from the
# benchmark's results); shapes of Llama-3.1-8B / Mistral-7B and Qwen2.5-7B, batch 1 and 2-8.
TUNED_TABLES = {(9, 0): "tuned_sm90.json"}


def set_config(K: int, N: int, B: int, dense: bool, config: GemvConfig) -> None:
    _CONFIGS[(K, N, B, dense)] = config


def config_from_list(t: list) -> GemvConfig:
    """A configuration from the benchmark's list form (block_n, kr, block_k, warps, stages, dot, compact, prefetch[,
    listed, split[, skip_rows]])."""
    bn, kr, bk, nw, ns, dot, compact, prefetch = t[:8]
    listed, split = (t[8], t[9]) if len(t) > 8 else (False, 1)
    skip_rows = t[10] if len(t) > 10 else True
    return GemvConfig(block_n=bn, kr=kr, block_k=bk, chunk=min(kr, 1024), num_warps=nw, num_stages=ns, use_dot=dot,
                      compact=compact, prefetch=prefetch, listed=listed, split=split, skip_rows=skip_rows)


def install_table(configs: dict, overwrite: bool = True) -> int:
    """Install a table {"KxNxP|B|dense": {"config": [...]}} (the benchmark's format; B 1, or 8 for batch 2-8).
    overwrite=False keeps configurations already set. Returns how many were installed."""
    n = 0
    for key, v in configs.items():
        shape, B, dense = key.split("|")
        K, N = (int(x) for x in shape.split("x")[:2])
        for b in ([int(B)] if int(B) == 1 else range(2, 9)):
            k = (K, N, b, bool(int(dense)))
            if overwrite or k not in _CONFIGS:
                _CONFIGS[k] = config_from_list(v["config"])
                n += 1
    return n


def install_tuned(device: torch.device | str) -> int:
    """Install the shipped table for `device`'s GPU generation (CUDA; none for others), keeping configurations
    already set (a sweep, `set_config`). Returns how many were installed."""
    import json
    import os

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    name = TUNED_TABLES.get(torch.cuda.get_device_capability(device))
    if name is None:
        return 0
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)) as f:
        return install_table(json.load(f)["configs"], overwrite=False)


def get_config(K: int, N: int, B: int, dense: bool = False) -> GemvConfig:
    return _CONFIGS.get((K, N, B, dense)) or default_config(K, N, B, dense=dense)


def reference_partials(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int], dense: bool,
                       kr: int) -> torch.Tensor:
    """The kernel's function in plain PyTorch: fp32 partial sums over input-channel slices of `kr`."""
    B, K = x.shape
    xm = []
    c0 = 0
    outs = []
    for p, w in enumerate(widths):
        xp = x if dense else x * (x.abs() > t[p].to(x.dtype))
        xm.append((xp.float(), c0, w))
        c0 += w
    splits = math.ceil(K / kr)
    for s in range(splits):
        k0, k1 = s * kr, min(K, (s + 1) * kr)
        outs.append(torch.cat([xp[:, k0:k1] @ wt[k0:k1, c:c + w].float() for xp, c, w in xm], dim=-1))
    return torch.stack(outs)


def _impl(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int], dense: bool,
          runner=None) -> torch.Tensor:
    B, K = x.shape
    N = wt.shape[1]
    cfg = get_config(K, N, B, dense)
    if x.device.type == "cuda" and HAVE_TRITON:
        return launch_sparse_gemv(x, wt, t, list(widths), dense=dense, config=cfg, runner=runner)
    if is_listed(cfg, B, dense):
        return reference_gemv_list(*reference_compact(x, t, cfg.kr), wt, list(widths), cfg)
    return reference_partials(x, wt, t, list(widths), dense, cfg.kr)


if HAVE_TRITON:

    @torch.library.triton_op("wisparse::sparse_gemv", mutates_args=())
    def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int],
                    dense: bool) -> torch.Tensor:
        return _impl(x, wt, t, widths, dense, runner=torch.library.wrap_triton)

else:  # pragma: no cover - exercised on installs without triton (CPU CI)

    @torch.library.custom_op("wisparse::sparse_gemv", mutates_args=())
    def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int],
                    dense: bool) -> torch.Tensor:
        return _impl(x, wt, t, widths, dense)

    @sparse_gemv.register_fake
    def _(x, wt, t, widths, dense):
        B, K = x.shape
        S = num_splits(K, wt.shape[1], B, get_config(K, wt.shape[1], B, dense), dense)
        return x.new_empty((S, B, wt.shape[1]), dtype=torch.float32)


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int], dense: bool = False,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = masked x @ wt (+ bias), in x's dtype; x may have leading dims (flattened to B <= 16 rows)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.wisparse.sparse_gemv(x2, wt, t, list(widths), dense).sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, wt.shape[1])


def gemv_list(idx: torch.Tensor, xv: torch.Tensor, cnt: torch.Tensor, wt: torch.Tensor, widths: list[int],
              config: GemvConfig, pdl: bool = False, sub: int | None = None) -> torch.Tensor:
    """Batch-1 sparse GEMV over survivor lists (Triton on CUDA, the PyTorch reference elsewhere).
    `pdl`: programmatic dependent launch (the version-4 decode step); `sub`: the lists' sub-list size (default
    config.kr, see `launch_gemv_list`)."""
    if wt.is_cuda and HAVE_TRITON:
        return launch_gemv_list(idx, xv, cnt, wt, list(widths), config, pdl=pdl, sub=sub)
    return reference_gemv_list(idx, xv, cnt, wt, list(widths), config, sub=sub)
