"""The built-in model end to end: its dense perplexity against method.md's independent reference figure."""
import pytest

import wisparse
from wisparse.data import role_windows


def test_builtin_model_is_a_cached_llama(builtin):
    model, tokenizer = builtin
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.bos_token_id is not None


def test_dense_perplexity_reproduces_the_reference(builtin, data_dir):
    """method.md: 19.13 on the first 8 test windows of 2048 tokens (fp32, independent script)."""
    model, tokenizer = builtin
    windows = role_windows("evaluation", tokenizer, 2048, 8, data_dir)
    result = wisparse.perplexity(model, windows, progress=False)
    assert result["ppl"] == pytest.approx(19.13, abs=0.01)
