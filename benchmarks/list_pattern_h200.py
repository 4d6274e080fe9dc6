"""Does the list GEMV lose bandwidth to the pattern of the rows it skips? (H200 diagnosis, session 8)

`python benchmarks/list_pattern_h200.py --configs benchmarks/results/configs_loop_tuned.json --out DIR` times the
batch-1 list GEMV of the Llama-3.1-8B shapes inside CUDA graphs (PDL launches, weights rotated past the L2) on
survivor lists of the same length but different patterns: random channels at 50%, the first half of every
segment (contiguous rows), every other channel, runs of 8 / 64 channels kept or dropped at random, and every
channel, or none (the fixed cost); and the dense kernel on the whole K and on K / 2 (the same bytes as 50%, contiguous). If the contiguous
half runs like the dense kernel on K / 2 and the random half does not, the row pattern costs the bandwidth.
Written: list_pattern.json and the table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from wisparse.engine.bench import _graph_time, _weights, install_configs  # noqa: E402
from wisparse.kernels import ops as kops  # noqa: E402
from wisparse.kernels.sparse_gemv import launch_compact, launch_gemv_list, launch_sparse_gemv  # noqa: E402

SHAPES = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gu": (4096, [14336, 14336]),
          "down": (14336, [4096])}


def keep_mask(K: int, seg: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """[K] bool: which input channels survive."""
    if pattern in ("all", "none"):
        return torch.full((K,), pattern == "all", dtype=torch.bool)
    if pattern == "random":
        return torch.rand(K, generator=gen) < 0.5
    if pattern == "first half":
        return (torch.arange(K) % seg) < seg // 2
    if pattern == "every other":
        return torch.arange(K) % 2 == 0
    run = int(pattern.split()[1])  # "runs 8": runs of `run` channels kept or dropped together
    return (torch.rand(K // run + 1, generator=gen) < 0.5).repeat_interleave(run)[:K]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="benchmarks/results/configs_loop_tuned.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with open(a.configs) as f:
        install_configs(json.load(f)["configs"], {f"{K}x{sum(w)}x{len(w)}": (K, w) for K, w in SHAPES.values()})
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (K, widths) in SHAPES.items():
        N = sum(widths)
        cfg = kops.get_config(K, N, 1, False)
        wts = _weights(K, N, torch.bfloat16)
        for pattern in ("random", "first half", "every other", "runs 8", "runs 64", "all", "none"):
            P = len(widths)
            keep = keep_mask(K, cfg.kr, pattern, gen).cuda()
            x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
            t = torch.where(keep, -1.0, float("inf")).expand(P, K).contiguous()
            lists = launch_compact(x, t, cfg.kr)
            tm = _graph_time(lambda i: launch_gemv_list(*lists, wts[i % len(wts)], widths, cfg, pdl=True))
            frac = keep.float().mean().item()
            nbytes = frac * K * N * 2
            rows.append({"group": name, "path": f"list, {pattern}", "kept": frac, "us": tm * 1e6,
                         "tbps": nbytes / tm / 1e12})
        dcfg = kops.get_config(K, N, 1, True)
        for k_used in (K, K // 2):
            wd = [w[:k_used] for w in wts]
            xd = torch.randn(1, k_used, device="cuda").to(torch.bfloat16)
            td = torch.zeros(len(widths), k_used, device="cuda")
            tm = _graph_time(lambda i: launch_sparse_gemv(xd, wd[i % len(wd)], td, widths, dense=True, config=dcfg,
                                                          pdl=True))
            rows.append({"group": name, "path": f"dense, K={k_used}", "kept": k_used / K, "us": tm * 1e6,
                         "tbps": k_used * N * 2 / tm / 1e12})
        for r in rows[-9:]:
            print(f"{r['group']:5s} {r['path']:22s} kept {r['kept']:.3f} {r['us']:7.2f} us {r['tbps']:5.2f} TB/s",
                  flush=True)
    with open(os.path.join(a.out, "list_pattern.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
