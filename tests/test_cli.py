"""Bad input through the CLI: one line on stderr, exit status 2, no traceback."""
import re

import pytest
import torch
from conftest import tiny_model

from wisparse.calibration import collect_stats
from wisparse.cli import main
from wisparse.sparsify import build_config, uniform_allocation


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # transformers' log handler keeps the stderr of whichever test first logged; quiet it so a warning in a
    # later test is not written to a closed capture stream (a pytest artefact, not wisparse output)
    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, builtin):
    """A tiny Llama with the built-in tokenizer's vocabulary and a NaN in one weight."""
    import transformers

    _, tokenizer = builtin
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fails(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("wisparse:")]
    assert len(errors) == 1 and errors[0].startswith("wisparse: error:"), err
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("sparsity", ["1.0", "-0.2", "1.5"])
def test_sparsity_outside_unit_interval(capsys, data_dir, sparsity):
    _fails(capsys, ["ppl", "--calibrate", "--sparsity", sparsity, "--data-dir", data_dir], r"\[0, 1\)")


def test_unknown_method(capsys, data_dir):
    _fails(capsys, ["sparsify", "--method", "magic", "--data-dir", data_dir, "-o", "x.json"], "unknown method")


def test_unknown_model(capsys):
    _fails(capsys, ["ppl", "--model", "no-such-org/no-such-model-xyz"], "could not load model")


def test_unsupported_architecture(capsys, tmp_path, builtin):
    import transformers

    _, tokenizer = builtin
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _fails(capsys, ["ppl", "--model", str(tmp_path)], "unsupported architecture 'gpt2'.*llama")


def test_missing_data(capsys, tmp_path):
    _fails(capsys, ["ppl", "--data-dir", str(tmp_path), "--eval-windows", "1"], "not found; tried")


def test_config_for_another_model(capsys, tmp_path):
    model = tiny_model("llama")
    stats = collect_stats(model, torch.randint(0, 128, (1, 32)), progress=False)
    build_config(model, stats, "teal", "threshold", uniform_allocation(model, "teal", 0.5)).save(tmp_path / "c.json")
    _fails(capsys, ["measure", "--config", str(tmp_path / "c.json")], "config is for another model")


def test_nan_activations(capsys, nan_model_dir, data_dir):
    _fails(capsys, ["ppl", "--model", str(nan_model_dir), "--data-dir", data_dir, "--eval-windows", "1",
                    "--window-len", "64"], "non-finite")
    _fails(capsys, ["sparsify", "--model", str(nan_model_dir), "--data-dir", data_dir, "--method", "teal",
                    "--calib-windows", "1", "--window-len", "64", "-o", "x.json"], "non-finite")


def test_sparsify_then_ppl_and_measure_with_the_saved_config(capsys, tmp_path, data_dir):
    config = str(tmp_path / "teal.json")
    assert main(["sparsify", "--method", "teal", "--sparsity", "0.4", "--data-dir", data_dir, "--calib-windows",
                 "1", "--window-len", "256", "-o", config]) == 0
    assert main(["ppl", "--config", config, "--data-dir", data_dir, "--eval-windows", "1",
                 "--window-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "teal threshold 0.40: perplexity" in out
    realised = float(re.search(r"realised sparsity ([0-9.]+)", out).group(1))
    assert abs(realised - 0.4) < 0.03  # thresholds from 256 calibration tokens, measured on other text
    assert main(["measure", "--config", config, "--text", "Paris is the capital of France. " * 10]) == 0
    assert '"model": 0.' in capsys.readouterr().out
    assert main(["generate", "--config", config, "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("[teal threshold 0.40] Hello")
