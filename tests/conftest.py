import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine with `pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- shared fixtures: tiny random models of every supported family, and the built-in model -----------------

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

DATA_DIR = os.environ.get("WISPARSE_DATA_DIR") or str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
HAVE_DATA = Path(DATA_DIR, "wikitext-2", "wiki.test.raw").exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="needs the offline data directory ($WISPARSE_DATA_DIR)")


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2):
    """A random-weight causal LM of `family` small enough for unit tests (fp32, CPU, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=32)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    model = cls(config).eval()
    return model


FAMILIES = ("llama", "mistral", "qwen2", "gemma3")


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer, loaded once per test session."""
    import wisparse

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return wisparse.load_model()


@pytest.fixture(scope="session")
def data_dir():
    if not HAVE_DATA:
        pytest.skip("needs the offline data directory ($WISPARSE_DATA_DIR)")
    return DATA_DIR


def crash_at_block(monkeypatch, index: int):
    """Make `BlockRunner.advance` raise KeyboardInterrupt when it reaches block `index` (a simulated crash of a
    long block-by-block job); returns the original method, to put back before resuming."""
    from wisparse.calibration import BlockRunner

    original = BlockRunner.advance

    def advance_then_die(self, block):
        if block == index:
            raise KeyboardInterrupt
        original(self, block)

    monkeypatch.setattr(BlockRunner, "advance", advance_then_die)
    return original
