import pytest
import torch
import torch.nn.functional as F

from wisparse.sparse_linear import SparseLinear, reference_threshold_mask, reference_topk_mask


def test_threshold_mask_keeps_strictly_greater_channels():
    x = torch.tensor([[0.5, -2.0, 1.0, -0.1]])
    t = torch.tensor([0.5, 1.0, 1.0, 0.0])
    assert torch.equal(reference_threshold_mask(x, t), torch.tensor([[0.0, -2.0, 0.0, -0.1]]))


def test_topk_mask_keeps_k_largest_weighted_scores_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    scale = torch.rand(16) + 0.5
    out = reference_topk_mask(x, scale, 6)
    assert ((out != 0).sum(-1) == 6).all()
    kept_scores = torch.where(out != 0, x.abs() * scale, torch.inf).amin(-1)
    dropped_scores = torch.where(out == 0, x.abs() * scale, -torch.inf).amax(-1)
    assert (kept_scores >= dropped_scores).all()


@pytest.mark.parametrize("mode", ["threshold", "topk", "dense"])
def test_sparse_linear_equals_linear_of_masked_input(mode):
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 24, bias=True)
    module = SparseLinear(linear, "p")
    x = torch.randn(2, 7, 32)
    if mode == "threshold":
        module.set_threshold(torch.rand(32))
        masked = reference_threshold_mask(x, module.threshold)
    elif mode == "topk":
        module.set_topk(10, torch.rand(32))
        masked = reference_topk_mask(x, module.score_scale, 10)
    else:
        masked = x
    torch.testing.assert_close(module(x), F.linear(masked, linear.weight, linear.bias))
    assert module.unwrap().weight is linear.weight


def test_positions_sparsify_only_the_last_fraction():
    linear = torch.nn.Linear(8, 4, bias=False)
    module = SparseLinear(linear)
    module.set_threshold(torch.full((8,), 10.0))  # drops everything where applied
    module.positions = 0.25
    x = torch.randn(1, 8, 8) + 0.1
    seen = {}
    module.meter = lambda m, a, b: seen.setdefault("masked", b)
    module(x)
    masked = seen["masked"]
    assert torch.equal(masked[:, :6], x[:, :6]) and (masked[:, 6:] == 0).all()
