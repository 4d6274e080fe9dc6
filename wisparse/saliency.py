"""Saliency scores, their calibrated thresholds, and top-k sizes.

Channel j of a projection's input x scores |x_j| * c_j ** alpha, with c_j = ||W[:, j]||_2 the column norm:
alpha = 0 is TEAL, alpha = 1 is WINA, WiSparse picks alpha per layer. Because c is static, the threshold test
|x_j| * c_j**alpha > tau equals |x_j| > tau / c_j**alpha: a per-channel threshold vector in activation units,
which is what `SparseLinear` and the kernels compare against.

Score distributions are kept as histograms of log2(score), so the threshold for any target sparsity is read off
without another pass over the data.
"""
from __future__ import annotations

import torch

from wisparse.errors import WisparseError

METHODS = ("teal", "wina", "wisparse", "cats")
MODES = ("threshold", "topk")
FIXED_ALPHA = {"teal": 0.0, "wina": 1.0}
DEFAULT_ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
LOG2_MIN, LOG2_MAX, BINS = -40.0, 24.0, 8192  # 0.0078 octave per bin: thresholds within ~0.5%


def column_norms(weights: list[torch.Tensor]) -> torch.Tensor:
    """||W[:, j]||_2 of the row-wise concatenation of `weights` (one weight, or a site's shared mask)."""
    squares = sum(w.detach().float().pow(2).sum(dim=0) for w in weights)
    return squares.sqrt().clamp_min(1e-12)


def score_scale(norms: torch.Tensor, alpha: float) -> torch.Tensor:
    return norms.pow(alpha)


class LogHistogram:
    """Histogram of log2(value) over a fixed range; exact zeros land in the lowest bin."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(BINS, dtype=torch.float64, device=device)

    def add_log2(self, log2_values: torch.Tensor) -> None:
        index = ((log2_values.reshape(-1) - LOG2_MIN) * (BINS / (LOG2_MAX - LOG2_MIN))).long().clamp_(0, BINS - 1)
        self.counts += torch.bincount(index, minlength=BINS).to(self.counts.device, torch.float64)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def quantile_log2(self, fraction: float) -> float:
        """log2 of the value below which `fraction` of the recorded values lie (linear inside a bin)."""
        if self.total == 0:
            raise WisparseError("no calibration values were recorded")
        cumulative = torch.cumsum(self.counts, 0) / self.total
        index = int(torch.searchsorted(cumulative, torch.tensor([fraction], dtype=torch.float64,
                                                                  device=cumulative.device)).item())
        index = min(index, BINS - 1)
        below = float(cumulative[index - 1]) if index > 0 else 0.0
        inside = float(cumulative[index]) - below
        position = (fraction - below) / inside if inside > 0 else 0.0
        width = (LOG2_MAX - LOG2_MIN) / BINS
        return LOG2_MIN + (index + min(max(position, 0.0), 1.0)) * width

    def fraction_below_log2(self, log2_value: float) -> float:
        width = (LOG2_MAX - LOG2_MIN) / BINS
        position = (log2_value - LOG2_MIN) / width
        index = int(min(max(position, 0), BINS))
        below = float(self.counts[:index].sum())
        if index < BINS:
            below += float(self.counts[index]) * (position - index)
        return below / self.total

    def merge_(self, other: "LogHistogram") -> "LogHistogram":
        self.counts += other.counts.to(self.counts.device)
        return self


def log2_abs(x: torch.Tensor) -> torch.Tensor:
    """log2|x| over the channels of a [..., in] activation, flattened to [tokens, in], checked for NaN/Inf."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if not torch.isfinite(flat).all():
        raise WisparseError("non-finite (NaN/Inf) activations during calibration: check the model and its dtype")
    return flat.abs().clamp_min(2.0**LOG2_MIN).log2()


def channel_threshold(hist: LogHistogram, sparsity: float, norms: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel threshold t_j = tau / c_j**alpha with tau the `sparsity`-quantile of the recorded scores."""
    if sparsity <= 0:
        return torch.zeros_like(norms)
    tau_log2 = hist.quantile_log2(sparsity)
    return torch.exp2(tau_log2 - alpha * norms.log2())


def topk_keep(in_features: int, sparsity: float) -> int:
    """Channels kept per token in top-k mode."""
    return in_features - int(round(sparsity * in_features))


def check_sparsity(value: float, what: str = "sparsity") -> float:
    if not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise WisparseError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


def check_method(method: str, mode: str) -> None:
    if method not in METHODS:
        raise WisparseError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise WisparseError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if method == "cats" and mode != "threshold":
        raise WisparseError("cats is a threshold method: use --mode threshold")
