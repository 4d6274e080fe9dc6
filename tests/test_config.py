import json

import pytest
import torch
from conftest import tiny_model

from wisparse.calibration import collect_stats
from wisparse.config import SparsityConfig, projection_numels
from wisparse.errors import WisparseError
from wisparse.sparsify import build_config, sparsify_, uniform_allocation


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("qwen2")
    stats = collect_stats(model, torch.randint(0, 128, (2, 48)), progress=False)
    sparsities = uniform_allocation(model, "wisparse", 0.4)
    alphas = {n: (0.5 if ".0." in n else 1.0) for n in sparsities}
    return model, build_config(model, stats, "wisparse", "threshold", sparsities, alphas)


def test_config_round_trips_through_json_and_safetensors(calibrated, tmp_path):
    model, config = calibrated
    path = config.save(tmp_path / "cfg.json")
    assert path.with_suffix(".safetensors").exists()
    record = json.loads(path.read_text())
    assert record["method"] == "wisparse" and record["version"] and record["model"]["model_type"] == "qwen2"
    loaded = SparsityConfig.load(path)
    assert loaded.projections.keys() == config.projections.keys()
    for name, setting in config.projections.items():
        assert loaded.projections[name].alpha == setting.alpha
        torch.testing.assert_close(loaded.projections[name].threshold, setting.threshold)
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        sparsify_(model, config)
        a = model(x).logits
        sparsify_(model, loaded)
        b = model(x).logits
    torch.testing.assert_close(a, b)


def test_model_sparsity_is_parameter_weighted(calibrated):
    model, config = calibrated
    numels = projection_numels(model)
    assert numels["model.layers.0.self_attn.k_proj"] < numels["model.layers.0.self_attn.q_proj"]  # GQA
    assert config.model_sparsity(numels) == pytest.approx(0.4)


def test_config_for_another_model_is_refused(calibrated):
    _, config = calibrated
    with pytest.raises(WisparseError, match="config is for another model"):
        sparsify_(tiny_model("llama"), config)  # other architecture
    with pytest.raises(WisparseError, match="weights of .* differ"):
        sparsify_(tiny_model("qwen2", seed=5), config)  # same shapes, other weights


def test_bad_config_files_are_refused(tmp_path):
    with pytest.raises(WisparseError, match="not found"):
        SparsityConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WisparseError, match="invalid JSON"):
        SparsityConfig.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(WisparseError, match="not a wisparse config"):
        SparsityConfig.load(tmp_path / "other.json")


def test_invalid_settings_are_refused():
    with pytest.raises(WisparseError, match=r"\[0, 1\)"):
        SparsityConfig("teal", "threshold", 1.0)
    with pytest.raises(WisparseError, match="positions"):
        SparsityConfig("teal", "threshold", 0.5, positions=0.0)
