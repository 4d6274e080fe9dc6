"""Perplexity over non-overlapping token windows, with realised sparsity measured on the same tokens."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wisparse.errors import WisparseError
from wisparse.eval.sparsity import SparsityMeter


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over `windows` [n, L]; every position after the first is predicted.

    Returns ppl, nll, tokens (predicted), windows, seconds and the realised sparsity report (`sparsity`).
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    with SparsityMeter(model) as meter:
        for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            batch = windows[i: i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            if not torch.isfinite(nll):
                raise WisparseError("non-finite (NaN/Inf) logits during evaluation: check the model and its dtype")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens, "windows": len(windows),
            "seconds": time.perf_counter() - start, "sparsity": meter.report()}
