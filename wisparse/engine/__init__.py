"""Decode engine: a compact Llama/Mistral/Qwen2 decoder, static KV cache, CUDA-graph decode step, benchmark.

    dec = Decoder.from_hf(model)                 # a (sparsified) transformers model, threshold mode
    dec = Decoder.random("llama-3.1-8b")         # or a named shape with random weights (speed only)
    gen = GraphGenerator(dec, batch=1, max_len=512, max_new_tokens=256)
    new_tokens = gen.generate(prompt_ids, 256)
"""
from .generate import GraphGenerator
from .model import Decoder
from .shapes import NAMED_SHAPES, hf_config

__all__ = ["Decoder", "GraphGenerator", "NAMED_SHAPES", "hf_config"]
