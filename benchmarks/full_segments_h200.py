"""Side by side on the GPU: the batch-1 list GEMV with and without the full-segment walk (`sparse_gemv.FULL_SEGMENTS`),
against F.linear, on the issue's two acceptance matrices, inside CUDA graphs (bench.time_kernel: inputs rotated,
weights rotated past the L2, lists written before the graph as in the decode step). Also down's 256-column
configuration next to its 128-column one. Writes full_segments.{json,md} to --out.

    python benchmarks/full_segments_h200.py --out $OUT   (on the GPU; `run_h200_variants.sh` style call)
"""
import argparse
import json
import os
from dataclasses import asdict, replace

import torch

import wisparse.kernels.sparse_gemv as sg
from wisparse.engine.bench import copy_bandwidth, install_configs, time_kernel, time_linear
from wisparse.kernels import ops as kops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="benchmarks/results/configs_loop_tuned.json")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    shapes = {"4096x14336x1": (4096, [14336]), "14336x4096x1": (14336, [4096])}
    with open(a.configs) as f:
        install_configs(json.load(f)["configs"], shapes)
    copy = copy_bandwidth() / 1e12
    rows = []
    for label, K, N in (("14336x4096 (gate/up shape)", 4096, 14336), ("4096x14336 (down shape)", 14336, 4096)):
        cfg = kops.get_config(K, N, 1, False)
        cfgs = [("loop-tuned", cfg)]
        if K == 14336:
            cfgs.append(("256 columns, split 2", replace(cfg, block_n=256, block_k=32, num_warps=4, num_stages=6,
                                                         split=2)))
        for rep in range(a.repeats):  # repeats interleaved, so drift hits every variant alike
            lin = time_linear(K, N, 1)["us"]
            rows.append({"matrix": label, "path": "F.linear", "sparsity": 0.0, "rep": rep, "us": lin})
            for sp in (0.0, 0.5, 0.9):
                for name, c in cfgs:
                    for full in (True, False):
                        if sp > 0 and not full:
                            continue  # no segment is full at 50% or 90%: the same walk
                        sg.FULL_SEGMENTS = full
                        r = time_kernel(K, [N], 1, sp, c, prelisted=True)
                        sg.FULL_SEGMENTS = True
                        rows.append({"matrix": label, "path": f"list {name}{', full walk' if full else ', list only'}",
                                     "sparsity": sp, "rep": rep, "us": r["us"], "tbps": r["tbps"],
                                     "copy_fraction": r["tbps"] / copy, "vs_linear": lin / r["us"],
                                     "realised": r["realised"], "config": asdict(c)})
                        print(f"{label} rep {rep} sp {sp} {rows[-1]['path']}: {r['us']:.2f} us "
                              f"({rows[-1]['copy_fraction']:.1%} of copy), F.linear {lin:.2f}", flush=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tbps": copy, "rows": rows}
    with open(os.path.join(a.out, "full_segments.json"), "w") as f:
        json.dump(res, f, indent=1)
    keys = sorted({(r["matrix"], r["path"], r["sparsity"]) for r in rows}, key=lambda k: (k[0], k[2], k[1]))
    lines = [f"# List GEMV: full-segment walk side by side ({res['gpu']}, copy {copy:.2f} TB/s)", "",
             "Median over interleaved repeats; each time itself a median inside a CUDA graph.", "",
             "| matrix | path | sparsity | us | of copy | F.linear / this |", "|---|---|---|---|---|---|"]
    for m, p, sp in keys:
        rs = [r for r in rows if (r["matrix"], r["path"], r["sparsity"]) == (m, p, sp)]
        us = sorted(r["us"] for r in rs)[len(rs) // 2]
        lin = sorted(r["us"] for r in rows if r["matrix"] == m and r["path"] == "F.linear")[a.repeats // 2]
        cf = sorted(r.get("copy_fraction", 0) for r in rs)[len(rs) // 2]
        lines.append(f"| {m} | {p} | {sp:.2f} | {us:.2f} | {cf:.1%} | {lin / us:.3f} |")
    with open(os.path.join(a.out, "full_segments.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
