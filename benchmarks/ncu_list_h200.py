"""Eager launches of the list GEMV (50%, random channels) and the dense kernel on the Llama-3.1-8B down and gate/up
shapes, for `ncu` (H200 diagnosis, session 8): `ncu --section ... python benchmarks/ncu_list_h200.py`."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from wisparse.engine.bench import _weights, install_configs  # noqa: E402
from wisparse.kernels import ops as kops  # noqa: E402
from wisparse.kernels.sparse_gemv import launch_compact, launch_gemv_list, launch_sparse_gemv  # noqa: E402

SHAPES = {"gu": (4096, [14336, 14336]), "down": (14336, [4096])}

with open("benchmarks/results/configs_loop_tuned.json") as f:
    install_configs(json.load(f)["configs"], {f"{K}x{sum(w)}x{len(w)}": (K, w) for K, w in SHAPES.values()})
gen = torch.Generator().manual_seed(0)
for name, (K, widths) in SHAPES.items():
    N = sum(widths)
    wts = _weights(K, N, torch.bfloat16)
    cfg, dcfg = kops.get_config(K, N, 1, False), kops.get_config(K, N, 1, True)
    keep = (torch.rand(K, generator=gen) < 0.5).cuda()
    t = torch.where(keep, -1.0, float("inf")).expand(len(widths), K).contiguous()
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    lists = launch_compact(x, t, cfg.kr)
    for i in range(3):  # ncu profiles the launches it is told to (--launch-skip / --launch-count)
        launch_gemv_list(*lists, wts[i % len(wts)], widths, cfg)
        launch_sparse_gemv(x, wts[i % len(wts)], t, widths, dense=True, config=dcfg)
    torch.cuda.synchronize()
print("done")
