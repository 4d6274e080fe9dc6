"""Sparse GEMV kernels (Triton) with the threshold test fused in, registered as `torch.ops.wisparse.*`.

`sparse_linear` / `torch.ops.wisparse.sparse_gemv` run the Triton kernel on CUDA tensors and the pure-PyTorch
reference (same semantics, same partial-sum layout) on CPU or where Triton is missing.
"""
from .sparse_gemv import HAVE_TRITON, GemvConfig, default_config, reference_sparse_gemv
from .ops import get_config, set_config, sparse_linear

__all__ = ["HAVE_TRITON", "GemvConfig", "default_config", "reference_sparse_gemv", "get_config", "set_config",
           "sparse_linear"]
