"""Batch-1 list-GEMV configurations of the kernel table's gate/up matrix (K 4096 -> N 14336) at 0% and 50%, against
F.linear, interleaved over rounds so that drift hits every row alike (H200). Question: is there a configuration as
fast as the swept one at 50% that is also no slower than F.linear at 0% (the issue's kernel-level criterion)?

`python benchmarks/list_zero_h200.py --out DIR` writes DIR/list_zero.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from wisparse.engine.bench import time_kernel, time_linear  # noqa: E402
from wisparse.kernels import ops as kops  # noqa: E402

CANDIDATES = [  # (block_n, kr, block_k, warps, stages, dot, compact, prefetch, listed, split)
    [128, 4096, 64, 4, 5, True, False, False, True, 2],  # the shipped sweep's choice
    [128, 2048, 64, 4, 5, True, False, False, True, 1],
    [128, 1024, 64, 4, 5, True, False, False, True, 1],
    [128, 1024, 32, 4, 8, True, False, False, True, 1],  # the fused gate/up configuration of the decode loop
    [128, 4096, 64, 4, 5, True, False, False, True, 3],
    [64, 1024, 64, 4, 5, True, False, False, True, 1],
    [128, 512, 64, 4, 5, True, False, False, True, 1],
    [256, 2048, 32, 4, 6, True, False, False, True, 2],  # 512-byte row pieces, as down's loop configuration
    [256, 1024, 32, 4, 6, True, False, False, True, 1],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="indices into CANDIDATES to time, e.g. '0,7' (default: all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    K, N = 4096, 14336
    cands = [CANDIDATES[int(i)] for i in a.only.split(",")] if a.only else CANDIDATES
    rows = {"F.linear": []} | {f"{c} sp={sp}": [] for c in cands for sp in (0.0, 0.5)}
    for _ in range(a.rounds):
        rows["F.linear"].append(time_linear(K, N, 1)["us"])
        for c in cands:
            for sp in (0.0, 0.5):
                rows[f"{c} sp={sp}"].append(time_kernel(K, [N], 1, sp, kops.config_from_list(c), prelisted=True)["us"])
    lin = statistics.median(rows["F.linear"])
    out = {"gpu": torch.cuda.get_device_name(), "K": K, "N": N, "rounds": a.rounds, "us": rows,
           "median_us": {k: statistics.median(v) for k, v in rows.items()}}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "list_zero.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{out['gpu']}; F.linear {lin:.2f} us (rounds {', '.join(f'{x:.2f}' for x in rows['F.linear'])})")
    for c in cands:
        z, h = out["median_us"][f"{c} sp=0.0"], out["median_us"][f"{c} sp=0.5"]
        print(f"{str(c):58s} 0%: {z:6.2f} us ({lin / z:.3f}x F.linear)  50%: {h:6.2f} us  "
              f"rounds 0% {', '.join(f'{x:.2f}' for x in rows[f'{c} sp=0.0'])}; "
              f"50% {', '.join(f'{x:.2f}' for x in rows[f'{c} sp=0.5'])}")


if __name__ == "__main__":
    main()
