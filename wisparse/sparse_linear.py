"""The module that masks its input and calls a linear kernel, plus the pure-PyTorch reference masks.

`reference_threshold_mask` and `reference_topk_mask` define the semantics every fast path (Triton kernels, the
compiled decode loop) is tested against:

* threshold mode: input channel j survives iff |x_j| > t_j, with t a per-channel threshold vector in activation
  units. A weight-aware score |x_j| * c_j**alpha > tau is folded in as t_j = tau / c_j**alpha.
* top-k mode: exactly k channels per token survive, the k largest |x_j| * s_j (s = c**alpha, the score scale).

Only the last `positions` fraction of each sequence is sparsified (1.0 = every position, the default).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_threshold_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x [..., in] with channels whose |x_j| <= threshold[j] set to zero."""
    return x * (x.abs() > threshold.to(x.dtype))


def reference_topk_mask(x: torch.Tensor, score_scale: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., in] keeping only the k channels of largest |x_j| * score_scale[j] per token."""
    if k >= x.shape[-1]:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    scores = x.abs().float() * score_scale.float()
    keep = scores.topk(k, dim=-1).indices
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, keep, True)
    return x * mask


def sparsified_positions(seq_len: int, positions: float) -> int:
    """How many trailing positions of a sequence of `seq_len` are sparsified."""
    return seq_len if positions >= 1.0 else int(math.ceil(positions * seq_len))


def sparsify_trailing(dense: torch.Tensor, sparse: torch.Tensor, positions: float) -> torch.Tensor:
    """`sparse` on the last `positions` fraction of the sequence dimension (-2), `dense` before it."""
    if positions >= 1.0 or dense.dim() < 2:
        return sparse
    start = dense.shape[-2] - sparsified_positions(dense.shape[-2], positions)
    return torch.cat([dense[..., :start, :], sparse[..., start:, :]], dim=-2)


class SparseLinear(nn.Module):
    """Drop-in replacement for `nn.Linear` that zeroes non-salient input channels before the matmul.

    It shares (does not copy) the wrapped linear's `weight` and `bias`, so `unwrap()` gives the original back.
    Buffers: `threshold` [in] (threshold mode), `score_scale` [in] (top-k mode). `meter` (optional) is called
    with the input and the masked input (also in dense mode, where it sees the natural zeros, e.g. after CATS)
    for realised-sparsity measurements.
    """

    def __init__(self, linear: nn.Linear, name: str = "") -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.name = name
        self.mode = "dense"  # "dense" | "threshold" | "topk"
        self.k = self.in_features
        self.positions = 1.0
        self.meter = None
        self.register_buffer("threshold", torch.zeros(self.in_features), persistent=False)
        self.register_buffer("score_scale", torch.ones(self.in_features), persistent=False)

    def set_threshold(self, threshold: torch.Tensor) -> None:
        self.mode = "threshold"
        self.threshold = threshold.detach().to(self.weight.device, torch.float32).reshape(self.in_features)

    def set_topk(self, k: int, score_scale: torch.Tensor) -> None:
        self.mode = "topk"
        self.k = int(k)
        self.score_scale = score_scale.detach().to(self.weight.device, torch.float32).reshape(self.in_features)

    def set_dense(self) -> None:
        self.mode = "dense"

    def mask_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "threshold":
            sparse = reference_threshold_mask(x, self.threshold)
        elif self.mode == "topk":
            sparse = reference_topk_mask(x, self.score_scale, self.k)
        else:
            sparse = x
        if sparse is not x:
            sparse = sparsify_trailing(x, sparse, self.positions)
        if self.meter is not None:
            self.meter(self, x, sparse)
        return sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.mask_input(x), self.weight, self.bias)

    def unwrap(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}, positions={self.positions}"
