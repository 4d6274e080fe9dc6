import math

import pytest
import torch
from conftest import crash_at_block, tiny_model

from wisparse.alpha import dense_reference, select_alphas, selection_loss
from wisparse.calibration import collect_stats
from wisparse.errors import WisparseError
from wisparse.eval.perplexity import perplexity
from wisparse.sparse_linear import SparseLinear
from wisparse.sparsify import build_config, sparsify_, uniform_allocation, unsparsify_


@pytest.mark.parametrize("criterion", ["nll", "kl"])
def test_block_search_is_never_worse_than_teal_or_wina_on_selection_text(criterion):
    model = tiny_model("llama", layers=3)
    stats = collect_stats(model, torch.randint(0, 128, (3, 48)), progress=False)
    selection = torch.randint(0, 128, (2, 48))
    sparsities = uniform_allocation(model, "wisparse", 0.5)
    alphas, record = select_alphas(model, stats, selection, "threshold", sparsities, search="block",
                                   criterion=criterion, progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # dense again
    assert set(alphas.values()) <= set(stats.alpha_grid)
    assert record["best_loss"] <= min(record["global_loss"].values())
    reference = dense_reference(model, selection, criterion)

    def loss(method, chosen=None):
        sparsify_(model, build_config(model, stats, method, "threshold", sparsities, chosen))
        value = selection_loss(model, selection, criterion, reference)
        unsparsify_(model)
        return value

    ours = loss("wisparse", alphas)
    assert abs(ours - record["best_loss"]) < 1e-5  # the incremental search scored exactly this model
    assert ours <= loss("teal") + 1e-6 and ours <= loss("wina") + 1e-6


def test_nll_criterion_is_the_log_perplexity_of_the_selection_text():
    model = tiny_model("llama", layers=2)
    selection = torch.randint(0, 128, (2, 40))
    nll = selection_loss(model, selection, "nll", dense_reference(model, selection, "nll"))
    assert abs(math.exp(nll) - perplexity(model, selection, progress=False)["ppl"]) < 1e-3 * math.exp(nll)
    assert selection_loss(model, selection, "kl", dense_reference(model, selection, "kl")) < 1e-4  # dense vs dense


def test_unknown_search_or_criterion_is_refused():
    model = tiny_model("llama", layers=1)
    with pytest.raises(WisparseError, match="alpha criterion"):
        select_alphas(model, None, torch.randint(0, 128, (1, 8)), "topk", {}, grid=(0.0,), criterion="mse")
    with pytest.raises(WisparseError, match="alpha search"):
        select_alphas(model, None, torch.randint(0, 128, (1, 8)), "topk", {}, grid=(0.0,), search="random")


def test_topk_selection_needs_no_statistics():
    model = tiny_model("qwen2")
    alphas, record = select_alphas(model, None, torch.randint(0, 128, (1, 32)), "topk",
                                   uniform_allocation(model, "wisparse", 0.4), grid=(0.0, 1.0), search="global",
                                   progress=False)
    assert set(alphas.values()) <= {0.0, 1.0} and record["evaluations"] == 2


def test_validated_search_chooses_by_held_out_windows():
    model = tiny_model("llama", layers=2)
    stats = collect_stats(model, torch.randint(0, 128, (2, 40)), progress=False)
    selection = torch.randint(0, 128, (4, 40))
    sparsities = uniform_allocation(model, "wisparse", 0.5)
    alphas, record = select_alphas(model, stats, selection, "threshold", sparsities, search="validated",
                                   progress=False)
    assert set(record["held_out_loss"]) == {"block", "global", "teal", "wina"}
    assert record["held_out_loss"][record["chosen"]] == min(record["held_out_loss"].values())
    if record["chosen"] == "teal":
        assert set(alphas.values()) == {0.0}


def test_interrupted_alpha_search_resumes_to_the_same_choice(tmp_path, monkeypatch):
    import json
    import sys

    alpha_module = sys.modules["wisparse.alpha"]
    model = tiny_model("llama", layers=4)
    stats = collect_stats(model, torch.randint(0, 128, (3, 48)), progress=False)
    selection = torch.randint(0, 128, (2, 48))
    sparsities = uniform_allocation(model, "wisparse", 0.5)
    calls = []
    original_loss = alpha_module._window_loss
    monkeypatch.setattr(alpha_module, "_window_loss", lambda *args: calls.append(1) or original_loss(*args))
    reference, reference_record = select_alphas(model, stats, selection, "threshold", sparsities, progress=False)
    full_run_losses = len(calls)
    path = tmp_path / "alpha.json"
    original_advance = crash_at_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        select_alphas(model, stats, selection, "threshold", sparsities, checkpoint=path, progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # dense again, even when interrupted
    assert json.loads(path.read_text())["blocks_done"] == 2
    monkeypatch.setattr(alpha_module.BlockRunner, "advance", original_advance)
    calls.clear()
    alphas, record = select_alphas(model, stats, selection, "threshold", sparsities, checkpoint=path, progress=False)
    assert len(calls) < full_run_losses - len(selection) * len(stats.alpha_grid)  # the saved work was not redone
    assert alphas == reference
    assert record["best_loss"] == pytest.approx(reference_record["best_loss"], rel=1e-6)
    assert record["evaluations"] == reference_record["evaluations"]
    with pytest.raises(WisparseError, match="checkpoint .* another"):
        select_alphas(model, stats, selection, "threshold", uniform_allocation(model, "wisparse", 0.4),
                      checkpoint=path, progress=False)


def test_a_block_change_needs_a_clear_gain_when_min_z_is_set():
    from wisparse.alpha import _clearly_lower

    current = [1.0, 1.0, 1.0, 1.0]
    assert _clearly_lower([0.9, 0.91, 0.89, 0.9], current, min_z=2.0)  # consistent gain on every window
    noisy = [0.5, 1.4, 0.6, 1.3]  # lower on the mean, but not window by window
    assert _clearly_lower(noisy, current, min_z=0.0) and not _clearly_lower(noisy, current, min_z=2.0)
    assert not _clearly_lower([1.1, 1.0, 1.0, 1.0], current, min_z=0.0)

    model = tiny_model("llama", layers=3)
    stats = collect_stats(model, torch.randint(0, 128, (3, 48)), progress=False)
    selection = torch.randint(0, 128, (3, 48))
    sparsities = uniform_allocation(model, "wisparse", 0.5)
    alphas, record = select_alphas(model, stats, selection, "threshold", sparsities, min_z=1e9, progress=False)
    assert record["block_changes"] == [] and set(alphas.values()) == {record["global_best"]}
    with pytest.raises(WisparseError, match="at least 2 selection windows"):
        select_alphas(model, stats, selection[:1], "threshold", sparsities, min_z=2.0, progress=False)
