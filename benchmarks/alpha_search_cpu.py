"""Ablation of WiSparse's alpha search on a 2-core CPU (small windows so it runs in about half an hour):
teal, wina and wisparse with the global, block and validated searches, threshold mode, uniform allocation.
Writes benchmarks/results/alpha_search_cpu.{json,md}.

    python benchmarks/alpha_search_cpu.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import wisparse
from wisparse.eval.cache import ResultCache
from wisparse.eval.report import write_results
from wisparse.eval.table import ppl_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--levels", default="0.4")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--selection-windows", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/alpha_search_cpu")
    parser.add_argument("--cache", default="runs/alpha_search_cpu.cache.jsonl")
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = wisparse.load_model()
    rows = []
    common = dict(data_dir=args.data_dir, eval_windows=args.eval_windows, calib_windows=args.calib_windows,
                  window_len=args.window_len, selection_windows=args.selection_windows,
                  cache=ResultCache(args.cache), progress=False)
    for level in [float(x) for x in args.levels.split(",")]:
        rows += ppl_table(model, tokenizer, [("teal", "threshold", level), ("wina", "threshold", level)], **common)
        for search in ("global", "block", "validated"):
            rows += ppl_table(model, tokenizer, [("wisparse", "threshold", level)], alpha_search=search, **common)
    protocol = {"model": "SmolLM2-135M-Instruct (built-in), float32", "device": platform.processor() or "cpu",
                "threads": torch.get_num_threads(),
                "evaluation": f"WikiText-2 test, first {args.eval_windows} windows of {args.window_len} tokens",
                "calibration": f"{args.calib_windows} x {args.window_len} train tokens, sequential refinement",
                "selection": f"{args.selection_windows} x {args.window_len} selection tokens (validated: half "
                             f"searched, half held out)",
                "wall_seconds": round(time.perf_counter() - start, 1)}
    for row in rows:
        row["method"] = row["method"] + (f" ({row['alpha_search']})" if "alpha_search" in row else "")
    _, md_path = write_results(args.out, protocol, rows, "Alpha search ablation (CPU, small windows)")
    print(md_path.read_text())


if __name__ == "__main__":
    main()
