"""Are two launch configurations' different greedy tokens rounding, or a wrong result? (H200)

A configuration change that splits K differently sums the fp32 partials in another order, so bf16 roundings (and,
when sparse, threshold decisions) can flip; through 32 layers of random weights such flips may grow until the
logits differ entirely. This script tells that apart from a wrong kernel: for random Llama-3.1-8B-shaped models of
1, 2, 4, 8 and 32 layers (thresholds calibrated for uniform 0.50), the first decode step's logits (eager, batch 1)
of each configuration are compared with the masked-`F.linear` step (`backend="cublas"`, the same thresholds) and
with each other; dense Triton against dense cuBLAS shows how far rounding alone carries. A wrong kernel shows up
at 1 layer; rounding grows with depth.

    python benchmarks/check_configs_h200.py --configs benchmarks/results/decode_h200.json \
        --cfg "qkv=64,1024,64,4,5,1" --cfg "gu=128,2048,32,4,8,1" --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from wisparse.engine.bench import _shape_dims, config_from_spec, engine_shapes, install_configs  # noqa: E402
from wisparse.engine.calibrate import calibrate, uniform_levels  # noqa: E402
from wisparse.engine.generate import GraphGenerator  # noqa: E402
from wisparse.engine.model import Decoder  # noqa: E402
from wisparse.kernels import ops as kops  # noqa: E402
from wisparse.kernels.sparse_gemv import GemvConfig  # noqa: E402


def parse_cfg(spec: str) -> dict[str, GemvConfig]:
    """'qkv=BLOCK_N,KR,BLOCK_K,WARPS,STAGES,SPLIT;o=...' -> batch-1 list-GEMV configurations by group."""
    return {g: config_from_spec(v) for g, v in (part.split("=") for part in spec.split(";"))}


@torch.no_grad()
def first_step(dec: Decoder, gen: GraphGenerator, prompt: torch.Tensor) -> torch.Tensor:
    gen.prefill(prompt)
    return dec.step().float().clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--configs", default="benchmarks/results/decode_h200.json")
    ap.add_argument("--cfg", action="append", default=[])
    ap.add_argument("--layers", default="1,2,4,8,32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dims = _shape_dims(a.model)
    shapes = {f"{K}x{sum(w)}x{len(w)}": (K, w) for K, w in dims.values()}
    with open(a.configs) as f:
        best = json.load(f)["configs"]
    res = {"gpu": torch.cuda.get_device_name(), "model": a.model, "rows": []}
    prompt = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    for n in (int(x) for x in a.layers.split(",")):
        install_configs({k: v for k, v in best.items() if k.split("|")[0] in shapes}, shapes)
        dec = Decoder.random(a.model, device="cuda", dtype=torch.bfloat16, seed=0, num_layers=n)
        gen = GraphGenerator(dec, batch=1, max_len=256, max_new_tokens=8, use_graph=False)
        group_shape = engine_shapes(dec)
        row = {"layers": n}
        dec.sparse, dec.backend = False, "cublas"
        dense_ref = first_step(dec, gen, prompt)
        dec.backend = "triton"
        row["dense triton vs cublas"] = rel(first_step(dec, gen, prompt), dense_ref)
        calibrate(dec, uniform_levels(dec, 0.5))
        dec.sparse, dec.backend = True, "cublas"
        ref = first_step(dec, gen, prompt)
        dec.backend = "triton"
        base = first_step(dec, gen, prompt)
        row["sparse base vs cublas"] = rel(base, ref)
        for spec in a.cfg:
            saved = {}
            for g, cfg in parse_cfg(spec).items():
                K, widths = group_shape[g]
                saved[g] = kops.get_config(K, sum(widths), 1, False)
                kops.set_config(K, sum(widths), 1, False, cfg)
            got = first_step(dec, gen, prompt)
            row[f"sparse {spec} vs cublas"] = rel(got, ref)
            row[f"sparse {spec} vs base"] = rel(got, base)
            for g, cfg in saved.items():
                K, widths = group_shape[g]
                kops.set_config(K, sum(widths), 1, False, cfg)
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        del dec, gen
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "check_configs.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
