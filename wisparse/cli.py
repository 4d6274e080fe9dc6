"""The `wisparse` command line. Each subcommand calls the public API; bad input ends in one line and exit 2.

    wisparse compare   dense + every method at one sparsity on the built-in model: a perplexity table (main job)
    wisparse sparsify  calibrate a config and save it (JSON + safetensors)
    wisparse ppl       WikiText-2 perplexity and realised sparsity, dense or with a config
    wisparse measure   realised sparsity of a config on any text
    wisparse generate  generate text, dense or sparse (the CUDA-graph engine on a GPU)
    wisparse bench     decode tokens/s dense vs sparse on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from wisparse.errors import WisparseError

DEFAULT_DEVICE = "auto"


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, model directory or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on GPU)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="offline data directory (default: $WISPARSE_DATA_DIR, else the Hugging Face hub)")
    p.add_argument("--window-len", type=int, default=2048, help="tokens per window (calibration and evaluation)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="wisparse", help="teal, wina, wisparse or cats")
    p.add_argument("--mode", default="threshold", help="threshold (calibrated, token-adaptive) or topk")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="target sparsity in [0, 1) (cats: of the MLP intermediate)")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows of --window-len tokens")
    p.add_argument("--selection-windows", type=int, default=2, help="selection windows for wisparse's alpha")
    p.add_argument("--alpha-search", default="block",
                   help="global (one alpha), block (the default: the global alpha, then each block tries its grid "
                        "neighbours) or validated (block search on half the selection windows, checked against "
                        "global, teal and wina on the other half)")
    p.add_argument("--alpha-criterion", default="kl",
                   help="what the alpha search minimises on selection text: kl (divergence from the dense model; "
                        "default) or nll (the text's perplexity; noisier)")
    p.add_argument("--alpha-min-z", type=float, default=0.0,
                   help="block search: take a block's change only if it lowers the loss by this many standard "
                        "errors of the per-window differences (default 0: any decrease)")
    p.add_argument("--no-sequential", action="store_true",
                   help="skip the sequential threshold refinement (faster; realised sparsity drifts)")
    p.add_argument("--share-site-masks", action="store_true", help="one mask per site instead of per projection")
    p.add_argument("--checkpoint", default=None,
                   help="save the calibration pass (and wisparse's alpha search, beside it) here and resume from them")
    p.add_argument("--positions", type=float, default=1.0,
                   help="fraction of each sequence's last positions that are sparsified (default 1.0: all)")


def _add_calibration_command_args(p: argparse.ArgumentParser) -> None:
    """Model, data and method options: what every subcommand that may calibrate takes."""
    _add_model_args(p)
    _add_data_args(p)
    _add_method_args(p)


def _add_config_or_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a saved config to apply")
    p.add_argument("--calibrate", action="store_true", help="calibrate --method/--sparsity first (else dense)")


def _load(args):
    """Check the method options first (a bad value should not wait for a model load), then load the model."""
    import wisparse
    from wisparse.saliency import check_method, check_sparsity

    if hasattr(args, "method"):
        check_method(args.method, args.mode)
        check_sparsity(args.sparsity)
    return wisparse.load_model(args.model, device=_device(args.device), dtype=args.dtype)


def _config_from_args(model, tokenizer, args):
    import wisparse

    return wisparse.calibrate(
        model, tokenizer, args.method, args.sparsity, args.mode, data_dir=args.data_dir,
        calib_windows=args.calib_windows, window_len=args.window_len, selection_windows=args.selection_windows,
        alpha_search=args.alpha_search, alpha_criterion=args.alpha_criterion, alpha_min_z=args.alpha_min_z,
        sequential=not args.no_sequential,
        share_site_masks=args.share_site_masks,
        positions=args.positions, checkpoint=args.checkpoint)


def _print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "mode", "nominal", "realised", "perplexity"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for row in rows:
        nominal = f"{row['sparsity_nominal']:.3f}"
        if row["method"] == "cats":
            nominal += f" ({row['sparsity_nominal_intermediate']:.2f} MLP mid)"
        table.add_row(row["method"], row["mode"], nominal, f"{row['sparsity_realised']:.3f}", f"{row['ppl']:.2f}")
    Console().print(table)


def cmd_compare(args) -> None:
    """Dense plus every method at one sparsity: the main job."""
    import wisparse
    from wisparse.eval.cache import ResultCache
    from wisparse.eval.report import write_results
    from wisparse.eval.table import ppl_table

    start = time.perf_counter()
    model, tokenizer = _load(args)
    wisparse.saliency.check_sparsity(args.sparsity)
    runs = [("dense", "-", 0.0)]
    runs += [(m, mode, args.sparsity) for mode in args.modes.split(",") for m in args.methods.split(",")
             if not (m == "cats" and mode != "threshold")]
    rows = ppl_table(model, tokenizer, runs, data_dir=args.data_dir, eval_windows=args.eval_windows,
                     calib_windows=args.calib_windows, window_len=args.window_len,
                     selection_windows=args.selection_windows, alpha_search=args.alpha_search,
                     alpha_criterion=args.alpha_criterion, alpha_min_z=args.alpha_min_z,
                     sequential=not args.no_sequential, positions=args.positions,
                     cache=ResultCache(args.cache), log=lambda line: print(line, flush=True))
    protocol = {"model": args.model or "SmolLM2-135M-Instruct (built-in)", "device": _device(args.device),
                "dtype": str(next(model.parameters()).dtype),
                "evaluation": f"WikiText-2 test, first {args.eval_windows} windows of {args.window_len} tokens",
                "calibration": f"{args.calib_windows} x {args.window_len} WikiText-2 train tokens",
                "positions sparsified": "all" if args.positions >= 1 else f"last {args.positions:.0%}",
                "wall_seconds": round(time.perf_counter() - start, 1)}
    _print_table(rows, f"WikiText-2 perplexity, {args.eval_windows} x {args.window_len} tokens "
                       f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        json_path, md_path = write_results(args.out, protocol, rows, "wisparse compare")
        print(f"wrote {json_path} and {md_path}")


def cmd_sparsify(args) -> None:
    model, tokenizer = _load(args)
    config = _config_from_args(model, tokenizer, args)
    path = config.save(args.output)
    print(f"wrote {path} ({config.method}, {config.mode}, target {config.target_sparsity:.3f}, "
          f"{len(config.projections)} projections)")


def _apply_config_or_method(model, tokenizer, args) -> str:
    """Sparsify from --config, or calibrate from --method/--sparsity when given; return a label."""
    import wisparse

    if args.config:
        config = wisparse.SparsityConfig.load(args.config)
    elif args.calibrate:
        config = _config_from_args(model, tokenizer, args)
    else:
        return "dense"
    wisparse.sparsify_(model, config)
    return f"{config.method} {config.mode} {config.target_sparsity:.2f}"


def cmd_ppl(args) -> None:
    import wisparse

    model, tokenizer = _load(args)
    label = _apply_config_or_method(model, tokenizer, args)
    windows = wisparse.role_windows("evaluation", tokenizer, args.window_len, args.eval_windows, args.data_dir,
                                    wisparse.bos_id(model, tokenizer))
    result = wisparse.perplexity(model, windows)
    realised = result["sparsity"].get("model", 0.0)
    print(f"{label}: perplexity {result['ppl']:.3f} on {result['windows']} x {args.window_len} tokens, "
          f"realised sparsity {realised:.3f}")
    if result["sparsity"]:
        print("by site: " + ", ".join(f"{k} {v:.3f}" for k, v in result["sparsity"]["by_site"].items()))


def cmd_measure(args) -> None:
    import torch

    import wisparse

    model, tokenizer = _load(args)
    wisparse.sparsify_(model, wisparse.SparsityConfig.load(args.config))
    if args.text_file:
        path = Path(args.text_file)
        if not path.exists():
            raise WisparseError(f"text file not found: {path}")
        text = path.read_text(encoding="utf-8")
    else:
        text = args.text
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.max_tokens]
    device = next(model.parameters()).device
    with wisparse.SparsityMeter(model) as meter, torch.no_grad():
        model(input_ids=ids.to(device), use_cache=False)
    report = meter.report()
    report = {k: v for k, v in report.items() if k != "by_projection" or args.per_projection}
    print(json.dumps({"tokens": ids.shape[1], **report}, indent=1))


def cmd_generate(args) -> None:
    import torch

    model, tokenizer = _load(args)
    label = _apply_config_or_method(model, tokenizer, args)
    device = next(model.parameters()).device
    if device.type == "cuda" and not args.no_engine:
        from wisparse.engine.cli import engine_generate

        text = engine_generate(model, tokenizer, args.prompt, args.max_new_tokens)
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"[{label}] {args.prompt}{text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wisparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="dense + every method at one sparsity: perplexity and realised sparsity",
                       description="Calibrate teal, wina, wisparse and cats at --sparsity on WikiText-2 train "
                                   "text and compare WikiText-2 test perplexity with the dense model.")
    _add_calibration_command_args(p)
    p.set_defaults(calib_windows=2, selection_windows=1, alpha_search="global")
    p.add_argument("--methods", default="teal,wina,wisparse,cats")
    p.add_argument("--modes", default="threshold,topk", help="comma-separated: threshold,topk")
    p.add_argument("--eval-windows", type=int, default=2, help="evaluation windows (the benchmark uses 32)")
    p.add_argument("--out", default="runs/compare", help="write OUT.json and OUT.md ('' to skip)")
    p.add_argument("--cache", default="runs/compare.cache.jsonl", help="result cache to resume from")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sparsify", help="calibrate a sparsity config and save it",
                       description="Calibrate thresholds (and wisparse's per-block alpha) on WikiText-2 train "
                                   "text; write OUTPUT.json plus OUTPUT.safetensors.")
    _add_calibration_command_args(p)
    p.add_argument("-o", "--output", required=True, help="config path (.json)")
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser("ppl", help="WikiText-2 test perplexity, dense or sparse",
                       description="Perplexity over non-overlapping windows of the WikiText-2 test split, with the "
                                   "realised sparsity measured on the same tokens. Dense unless --config or "
                                   "--calibrate is given.")
    _add_calibration_command_args(p)
    _add_config_or_calibrate_args(p)
    p.add_argument("--eval-windows", type=int, default=8, help="how many evaluation windows (at most)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("measure", help="realised sparsity of a config on any text",
                       description="Run text through the sparsified model and report the fraction of input "
                                   "channels zeroed, per site, per projection type and parameter-weighted.")
    _add_model_args(p)
    p.add_argument("--config", required=True)
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog. " * 20)
    p.add_argument("--text-file", default=None)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--per-projection", action="store_true")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("generate", help="generate text, dense or sparse",
                       description="Greedy generation; with a CUDA GPU through the graph-captured decode engine, "
                                   "otherwise through transformers' generate on the same sparse modules.")
    _add_calibration_command_args(p)
    _add_config_or_calibrate_args(p)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-engine", action="store_true", help="use transformers' generate even on a GPU")
    p.set_defaults(func=cmd_generate)

    from wisparse.engine.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except WisparseError as err:
        print(f"wisparse: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wisparse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
