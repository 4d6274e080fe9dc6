"""CLI glue for the decode engine: the `bench` subcommand and the GPU path of `wisparse generate`."""
from __future__ import annotations


def add_bench_parser(subparsers):
    """Add `wisparse bench` (decode speed, dense vs sparse, on a CUDA GPU) to an argparse subparsers object."""
    from . import bench

    p = subparsers.add_parser(
        "bench", help="decode tokens/s dense vs sparse on a CUDA GPU (random-weight named shapes)",
        description="Measure decode speed: Triton sparse GEMV kernels inside CUDA graphs against F.linear, and the "
                    "graph-captured decode loop dense vs sparse (uniform levels, a non-uniform config, batch sizes, "
                    "context lengths) on random-weight models of named shapes. Writes OUT.json and OUT.md.")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run_from_args, handler=bench.run_from_args)
    return p


def engine_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy generation of a (sparsified) transformers model through the CUDA-graph decode engine.

    The model's projection weights are re-pointed to the engine's transposed storage (one copy; the model still
    works). Stops at the tokenizer's EOS token. Returns the generated text (without the prompt).
    """
    import torch

    from .generate import GraphGenerator
    from .model import Decoder

    dec = getattr(model, "_wisparse_decoder", None)
    if dec is None:
        dec = Decoder.from_hf(model)
        model._wisparse_decoder = dec
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dec.device)
    gen = None  # the fallback below also runs when the generator itself cannot be built
    try:
        gen = GraphGenerator(dec, batch=1, max_len=ids.shape[1] + max_new_tokens + 1, max_new_tokens=max_new_tokens)
        out = gen.generate(ids, max_new_tokens)[0].tolist()
    except Exception as err:  # say so loudly, then still answer through transformers (same weights, same masks)
        import sys

        print(f"wisparse: decode engine failed ({type(err).__name__}: {err}); using transformers generate",
              file=sys.stderr)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    for i, t in enumerate(out):
        if t in eos:
            out = out[:i]
            break
    del gen
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tokenizer.decode(out, skip_special_tokens=True)
