"""Named model shapes (the real configs' values) for random-weight speed measurements.

Values copied from the published `config.json` of each model; no weights are involved.
"""
from __future__ import annotations

NAMED_SHAPES: dict[str, tuple[str, dict]] = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001)),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=32768,
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=131072,
        rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)),
}


def hf_config(name: str, **overrides):
    """A `transformers` config object for a named shape (for RoPE tables and the engine's dimensions)."""
    from transformers import AutoConfig

    if name not in NAMED_SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    model_type, kwargs = NAMED_SHAPES[name]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})
