"""Greedy generation with the decode step captured in a CUDA graph (no host syncs inside the loop).

    gen = GraphGenerator(decoder, batch=1, max_len=512)
    tokens = gen.generate(prompt_ids [B, T], max_new_tokens=256)   # [B, max_new_tokens]

The captured step reads the current token and position from device buffers, writes the K/V cache, takes the
argmax, stores it into the output buffer at a device-side counter and advances the position: replaying the graph
n times decodes n tokens with one synchronisation at the end. On CPU (or with `use_graph=False`) the same step runs
eagerly (and on CPU through the kernels' PyTorch references).
"""
from __future__ import annotations

import torch

from ..kernels.decode_ops import argmax_rows
from .model import Decoder


class GraphGenerator:
    def __init__(self, decoder: Decoder, batch: int = 1, max_len: int = 512, max_new_tokens: int = 256,
                 use_graph: bool | None = None):
        self.dec = decoder
        self.batch, self.max_len, self.max_new = batch, max_len, max_new_tokens
        self.use_graph = decoder.device.type == "cuda" if use_graph is None else use_graph
        decoder.setup_cache(batch, max_len)
        # this generator's buffers; re-bound to the decoder before each use (another generator may have replaced
        # them), so a captured graph always finds the tensors it was captured with
        self._state = (decoder.k_cache, decoder.v_cache, decoder.cos, decoder.sin, decoder.tokens, decoder.B,
                       decoder.L)
        dev = decoder.device
        self.out = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=dev)
        self.idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = None
        self.graph = None

    def _bind(self) -> None:
        d = self.dec
        d.k_cache, d.v_cache, d.cos, d.sin, d.tokens, d.B, d.L = self._state

    def _step(self) -> None:
        d = self.dec
        logits = d.step()
        # the next token into d.tokens and self.out[:, idx], then idx and pos advance (one launch on CUDA)
        argmax_rows(logits, pdl=d.fused and d.pdl and d.device.type == "cuda",
                    advance=(d.tokens, self.out, self.idx, d.pos))
        self.logits = logits

    def capture(self) -> None:
        """Warm up (compiles the Triton kernels) and capture the step; the cache contents are restored after."""
        self._bind()
        d = self.dec
        saved = (d.pos.clone(), d.tokens.clone(), self.idx.clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        d.pos.copy_(saved[0])
        d.tokens.copy_(saved[1])
        self.idx.copy_(saved[2])
        torch.cuda.synchronize()

    def replay(self) -> None:
        if self.use_graph:
            if self.graph is None:
                self.capture()
            self.graph.replay()
        else:
            self._step()

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt [B, T] -> first generated token [B] (greedy); the cache holds the prompt."""
        self._bind()
        logits = self.dec.prefill(prompt.to(self.dec.device))
        first = logits[:, -1].argmax(-1)
        self.dec.tokens.copy_(first)
        self.idx.zero_()
        return first

    @torch.no_grad()
    def decode(self, n: int) -> torch.Tensor:
        """n graph replays (no host sync inside); returns the n tokens generated [B, n]."""
        assert n <= self.max_new
        self._bind()
        start = int(self.dec.pos.item()) if not self.use_graph else None
        if start is not None:
            assert start + n <= self.max_len
        for _ in range(n):
            self.replay()
        return self.out[:, :n]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: [B, max_new_tokens] new tokens (the first from the prefill's last logits)."""
        if self.use_graph and self.graph is None:
            self.capture()
        T = prompt.shape[1]
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed the cache ({self.max_len})")
        first = self.prefill(prompt)
        if max_new_tokens <= 1:
            return first[:, None][:, :max_new_tokens]
        rest = self.decode(max_new_tokens - 1)
        return torch.cat([first[:, None], rest], dim=1)
