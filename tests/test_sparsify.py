import pytest
import torch
from conftest import FAMILIES, tiny_model

from wisparse.calibration import collect_stats
from wisparse.eval.sparsity import SparsityMeter
from wisparse.sparse_linear import SparseLinear
from wisparse.sparsify import ThresholdedActivation, build_config, sparsify_, uniform_allocation, unsparsify_


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsify_in_place_changes_outputs_and_unsparsify_restores_them(family):
    model = tiny_model(family)
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        dense = model(x).logits
    stats = collect_stats(model, torch.randint(0, 128, (2, 32)), progress=False)
    config = build_config(model, stats, "teal", "threshold", uniform_allocation(model, "teal", 0.5))
    assert sparsify_(model, config) is model
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        sparse = model(x).logits
        generated = model.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert not torch.allclose(dense, sparse)
    assert generated.shape == (1, 9)
    unsparsify_(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense)


def test_topk_mode_realises_exactly_the_nominal_sparsity():
    model = tiny_model("mistral")
    config = build_config(model, None, "wina", "topk", uniform_allocation(model, "wina", 0.25))
    sparsify_(model, config)
    with SparsityMeter(model) as meter, torch.no_grad():
        model(torch.randint(0, 128, (1, 30)))
    report = meter.report()
    assert all(abs(s - 0.25) < 1 / 64 for s in report["by_projection"].values())


def test_shared_site_masks_give_q_k_v_one_threshold():
    model = tiny_model("llama")
    stats = collect_stats(model, torch.randint(0, 128, (2, 32)), progress=False)
    config = build_config(model, stats, "wina", "threshold", uniform_allocation(model, "wina", 0.5),
                          share_site_masks=True)
    q, k, v = (config.projections[f"model.layers.1.self_attn.{p}_proj"].threshold for p in "qkv")
    assert torch.equal(q, k) and torch.equal(k, v)
    separate = build_config(model, stats, "wina", "threshold", uniform_allocation(model, "wina", 0.5))
    assert not torch.equal(separate.projections["model.layers.1.self_attn.q_proj"].threshold,
                           separate.projections["model.layers.1.self_attn.k_proj"].threshold)


def test_cats_masks_only_the_mlp_intermediate():
    model = tiny_model("llama")
    stats = collect_stats(model, torch.randint(0, 128, (2, 32)), progress=False)
    config = build_config(model, stats, "cats", "threshold", uniform_allocation(model, "cats", 0.6))
    sparsify_(model, config)
    assert isinstance(model.model.layers[0].mlp.act_fn, ThresholdedActivation)
    with SparsityMeter(model) as meter, torch.no_grad():
        model(torch.randint(0, 128, (2, 32)))
    report = meter.report()
    assert report["by_site"]["mlp_mid"] > 0.4 and report["by_site"]["attn_in"] == 0.0
    unsparsify_(model)
    assert not isinstance(model.model.layers[0].mlp.act_fn, ThresholdedActivation)
