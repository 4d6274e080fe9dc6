"""Does the selection criterion rank alphas the way test perplexity does? For every alpha of the grid (one alpha
for all blocks, dense-pass thresholds, uniform 0.40, threshold mode), the KL to dense and the perplexity on the
selection windows, next to WikiText-2 test perplexity. 2-core CPU, about 7 minutes.

    python benchmarks/alpha_criteria_cpu.py --data-dir ../shared/data > benchmarks/results/alpha_criteria_cpu.txt
"""
from __future__ import annotations

import argparse

import wisparse
from wisparse.alpha import dense_reference, selection_loss
from wisparse.sparsify import build_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--window-len", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = wisparse.load_model()
    windows = {role: wisparse.role_windows(role, tokenizer, args.window_len, n, args.data_dir)
               for role, n in (("calibration", 8), ("selection", 4), ("evaluation", 16))}
    stats = wisparse.collect_stats(model, windows["calibration"], progress=False)
    sparsities = wisparse.uniform_allocation(model, "wisparse", args.sparsity)
    reference = dense_reference(model, windows["selection"], "kl")
    print(f"SmolLM2-135M-Instruct fp32 CPU, uniform {args.sparsity}, threshold mode, dense-pass thresholds from "
          f"8x{args.window_len} calibration tokens; selection 4x{args.window_len}; test 16x{args.window_len}")
    for alpha in stats.alpha_grid:
        config = build_config(model, stats, "wisparse", "threshold", sparsities, {n: alpha for n in sparsities})
        wisparse.sparsify_(model, config)
        kl = selection_loss(model, windows["selection"], "kl", reference)
        selection_ppl = wisparse.perplexity(model, windows["selection"], progress=False)["ppl"]
        test_ppl = wisparse.perplexity(model, windows["evaluation"], progress=False)["ppl"]
        print(f"alpha {alpha}: selection KL {kl:.5f} selection ppl {selection_ppl:.3f} test ppl {test_ppl:.3f}",
              flush=True)
        wisparse.unsparsify_(model)


if __name__ == "__main__":
    main()
