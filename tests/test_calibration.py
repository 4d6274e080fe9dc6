import pytest
import torch
from conftest import crash_at_block, tiny_model

from wisparse.calibration import collect_stats, recalibrate_sequential
from wisparse.eval.sparsity import SparsityMeter
from wisparse.sparsify import build_config, sparsify_, uniform_allocation


@pytest.fixture(scope="module")
def model_and_windows():
    model = tiny_model("llama", layers=3)
    return model, torch.randint(0, 128, (4, 64))


def _realised(model, windows):
    with SparsityMeter(model) as meter, torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    return meter.report()


def test_dense_pass_records_every_projection_site_and_alpha(model_and_windows):
    model, windows = model_and_windows
    stats = collect_stats(model, windows, progress=False)
    assert stats.tokens == windows.numel()
    names = [n for n, _ in model.named_modules() if n.endswith("_proj")]
    for name in names:
        assert set(stats.hists[name]) == set(stats.alpha_grid)
        in_features = model.get_submodule(name).in_features
        assert all(h.total == windows.numel() * in_features for h in stats.hists[name].values())
    assert any(key.endswith("attn_in") for key in stats.hists)
    assert len(stats.cats) == 3


@pytest.mark.parametrize("method,sparsity", [("teal", 0.5), ("wina", 0.3), ("cats", 0.6)])
def test_sequential_thresholds_hit_the_target_on_calibration_tokens(model_and_windows, method, sparsity):
    model, windows = model_and_windows
    stats = collect_stats(model, windows, progress=False)
    config = build_config(model, stats, method, "threshold", uniform_allocation(model, method, sparsity))
    sparsify_(model, config)
    recalibrate_sequential(model, config, windows, progress=False)
    report = _realised(model, windows)
    for name, realised in report["by_projection"].items():
        target = config.projections[name].sparsity
        assert abs(realised - target) < 0.01, (name, realised, target)
    assert config.calibration["sequential"]


def test_dense_pass_thresholds_drift_upstream_sparsity_is_what_sequential_fixes(model_and_windows):
    model, windows = model_and_windows
    stats = collect_stats(model, windows, progress=False)
    config = build_config(model, stats, "teal", "threshold", uniform_allocation(model, "teal", 0.5))
    sparsify_(model, config)
    first_block = [n for n in config.projections if ".0." in n]
    report = _realised(model, windows)
    for name in first_block[:3]:  # block 0's attention input sees exactly the calibration distribution
        assert abs(report["by_projection"][name] - 0.5) < 0.01


def test_interrupted_calibration_resumes_from_its_checkpoint(tmp_path, model_and_windows, monkeypatch):
    from wisparse.calibration import BlockRunner
    from wisparse.errors import WisparseError

    model, windows = model_and_windows
    path = tmp_path / "stats.pt"
    reference = collect_stats(model, windows, progress=False)
    original_advance = crash_at_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        collect_stats(model, windows, progress=False, checkpoint=path, checkpoint_seconds=0)
    assert torch.load(path, weights_only=False)["next_block"] == 2
    monkeypatch.setattr(BlockRunner, "advance", original_advance)
    resumed = collect_stats(model, windows, progress=False, checkpoint=path)
    for key, by_alpha in reference.hists.items():
        for alpha, hist in by_alpha.items():
            assert torch.equal(resumed.hists[key][alpha].counts, hist.counts), key
    with pytest.raises(WisparseError, match="checkpoint .* another"):
        collect_stats(model, windows[:2], progress=False, checkpoint=path)


def test_calibration_module_is_not_shadowed_by_the_calibrate_function():
    """`wisparse.calibrate` is the public function; the module keeps its own name so `import wisparse.calibration`
    (and attribute access through the package) reaches the module, not the function."""
    import types

    import wisparse
    import wisparse.calibration as calibration_module

    assert isinstance(calibration_module, types.ModuleType) and hasattr(calibration_module, "collect_stats")
    assert callable(wisparse.calibrate) and not isinstance(wisparse.calibrate, types.ModuleType)
