import pytest
import torch

from wisparse.errors import WisparseError
from wisparse.saliency import LogHistogram, channel_threshold, check_method, check_sparsity, column_norms, log2_abs


def test_histogram_quantile_matches_exact_quantile():
    torch.manual_seed(0)
    values = torch.randn(200_000).abs() * torch.rand(200_000) * 5
    hist = LogHistogram()
    hist.add_log2(values.log2())
    for q in (0.1, 0.25, 0.5, 0.7, 0.9):
        exact = torch.quantile(values[:100_000], q).item()  # torch.quantile caps its input size
        approx = 2 ** hist.quantile_log2(q)
        assert abs(approx / exact - 1) < 0.03
        assert abs(hist.fraction_below_log2(hist.quantile_log2(q)) - q) < 1e-3


def test_per_channel_threshold_is_the_weight_aware_score_test():
    torch.manual_seed(1)
    weight = torch.randn(48, 32) * torch.rand(32) * 3
    x = torch.randn(500, 32)
    norms = column_norms([weight])
    for alpha in (0.0, 0.5, 1.0):
        hist = LogHistogram()
        hist.add_log2(log2_abs(x) + alpha * norms.log2())
        threshold = channel_threshold(hist, 0.4, norms, alpha)
        by_threshold = x.abs() > threshold
        tau = 2 ** hist.quantile_log2(0.4)
        by_score = x.abs() * norms**alpha > tau
        assert (by_threshold != by_score).float().mean() < 1e-3  # only float rounding at the boundary
        assert abs((~by_threshold).float().mean().item() - 0.4) < 0.01


def test_column_norms_of_a_site_are_of_the_concatenated_weight():
    a, b = torch.randn(8, 6), torch.randn(4, 6)
    torch.testing.assert_close(column_norms([a, b]), torch.cat([a, b]).norm(dim=0))


def test_non_finite_activations_are_refused():
    with pytest.raises(WisparseError, match="non-finite"):
        log2_abs(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(WisparseError, match=r"in \[0, 1\)"):
        check_sparsity(bad)


def test_unknown_method_and_mode_are_refused():
    with pytest.raises(WisparseError, match="unknown method 'foo'"):
        check_method("foo", "threshold")
    with pytest.raises(WisparseError, match="unknown mode"):
        check_method("teal", "bar")
    with pytest.raises(WisparseError, match="cats is a threshold method"):
        check_method("cats", "topk")
