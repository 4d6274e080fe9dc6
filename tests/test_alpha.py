import torch
from conftest import tiny_model

from wisparse.alpha import dense_log_probs, kl_to_dense, select_alphas
from wisparse.calibrate import collect_stats
from wisparse.sparse_linear import SparseLinear
from wisparse.sparsify import build_config, sparsify_, uniform_allocation, unsparsify_


def test_block_search_is_never_worse_than_teal_or_wina_on_selection_text():
    model = tiny_model("llama", layers=3)
    stats = collect_stats(model, torch.randint(0, 128, (3, 48)), progress=False)
    selection = torch.randint(0, 128, (2, 48))
    sparsities = uniform_allocation(model, "wisparse", 0.5)
    alphas, record = select_alphas(model, stats, selection, "threshold", sparsities, progress=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # dense again
    assert set(alphas.values()) <= set(stats.alpha_grid)
    assert record["best_kl"] <= min(record["global_kl"].values())
    reference = dense_log_probs(model, selection)

    def kl(method, chosen=None):
        sparsify_(model, build_config(model, stats, method, "threshold", sparsities, chosen))
        value = kl_to_dense(model, selection, reference)
        unsparsify_(model)
        return value

    ours = kl("wisparse", alphas)
    assert abs(ours - record["best_kl"]) < 1e-5  # the incremental search scored exactly this model
    assert ours <= kl("teal") + 1e-6 and ours <= kl("wina") + 1e-6


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
    assert set(record["held_out_kl"]) == {"block", "global", "teal", "wina"}
    assert record["held_out_kl"][record["chosen"]] == min(record["held_out_kl"].values())
    if record["chosen"] == "teal":
        assert set(alphas.values()) == {0.0}
