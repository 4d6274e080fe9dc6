"""Write the launch configurations the full benchmark reads: run 10's sweep, with the batch-1 list GEMVs of q/k/v,
o and down, and the batch-1 dense GEMVs of q/k/v, o and down, replaced by the configurations that won inside the
decode loop (session 7's timeline runs 17-19 sparse, 21-22 dense; session 10's runs 43-44 for the sparse down), and
the kernel table's gate/up matrix alone (K 4096 -> N 14336, not a decode-loop shape: the loop fuses gate|up) by
interleaved timing at 0% and 50% (session 11's runs 51-52, `list_zero_h200.py`).

The sweep times each GEMV alone in a graph, where these candidates were within 0.3 us of run 10's choices; in the
loop, 64-column tiles over 1024-channel segments halve the partials that the attention split (q/k/v) and the norm
(o) sum and gave 341.4 tok/s against 334.8 in the same runs (Llama-3.1-8B at 0.50; Mistral-7B has the same
shapes). Qwen2.5-7B's shapes keep run 10's choices (not measured in the loop).

    python benchmarks/loop_tuned_configs.py   # -> benchmarks/results/configs_loop_tuned.json
                                              #    and the library's shipped table wisparse/kernels/tuned_sm90.json
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "results", "decode_h200_run10.json")
OUT = os.path.join(HERE, "results", "configs_loop_tuned.json")
TABLE = os.path.join(HERE, "..", "wisparse", "kernels", "tuned_sm90.json")  # installed by Decoder on sm_90 GPUs
# key -> (where it was measured, [block_n, kr, block_k, warps, stages, dot, compact, prefetch, listed, split])
LOOP = "decode-loop timeline, session"
LOOP_TUNED = {
    # sparse (list GEMVs), runs 17-19
    "4096x6144x3|1|0": (f"{LOOP} 7", [64, 1024, 64, 4, 5, True, False, False, True, 1]),  # q|k|v: run 10: split 2
    "4096x4096x1|1|0": (f"{LOOP} 7", [64, 1024, 64, 4, 5, True, False, False, True, 1]),  # o: run 10: 64, 512, ...
    # down, runs 43-44: 512-byte row pieces in two parts per segment; equal in the step (347.7 against 347.3, run 43),
    # faster alone in a graph (18.9 against 19.4 us at 50%, 31.0 against 31.8 at 0%, run 44); run 10 had 128, ...
    "14336x4096x1|1|0": (f"{LOOP} 10", [256, 2048, 32, 4, 6, True, False, False, True, 2]),
    # gate/up alone (kernel table), runs 51-52: the same 512-byte pieces; over 7 interleaved rounds 30.71 against
    # 31.14 us at 0% (faster in every round) and 18.32 against 18.34 at 50%; run 10 had 128, 4096, 64, 4, 5, split 2
    "4096x14336x1|1|0": ("interleaved 0% / 50% timing (list_zero_h200.py), session 11",
                         [256, 2048, 32, 4, 6, True, False, False, True, 2]),
    # dense, runs 21-22 (the baseline gets the same treatment): down with 7 partials instead of 28 (the next norm
    # sums them), q|k|v and o with 4 instead of 8: 226.6 -> 234.8 tok/s in the same timeline run
    "14336x4096x1|1|1": (f"{LOOP} 7", [128, 2048, 64, 4, 3, True, False, False]),  # down: run 10 had 64, 512, 64, 4, 4
    "4096x6144x3|1|1": (f"{LOOP} 7", [64, 1024, 64, 4, 3, True, False, False]),  # q|k|v: run 10 had 128, 512, 64, 4, 3
    "4096x4096x1|1|1": (f"{LOOP} 7", [64, 1024, 64, 4, 4, True, False, False]),  # o: run 10 had 64, 512, 64, 4, 4
}


def main() -> None:
    with open(SOURCE) as f:
        run10 = json.load(f)
    configs = dict(run10["configs"])
    for key, (origin, cfg) in LOOP_TUNED.items():
        configs[key] = {"config": cfg, "from": origin,
                        "replaces": configs[key]["config"]}
    out = {"configs": configs, "env": {"date_utc": run10["env"]["date_utc"]},
           "note": f"{os.path.relpath(SOURCE, HERE)} with batch-1 GEMVs tuned in the decode loop, sparse and dense"}
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
    table = {"source": "benchmarks/results/configs_loop_tuned.json (written by benchmarks/loop_tuned_configs.py)",
             "measured_on": "NVIDIA H200 (runs 10, 17-23, 43-44, 51-52)",
             "configs": {k: {"config": v["config"]} for k, v in configs.items()}}
    with open(TABLE, "w") as f:
        json.dump(table, f, indent=0)
    print(f"wrote {OUT} and {os.path.normpath(TABLE)} ({len(configs)} configurations)")


if __name__ == "__main__":
    main()
