"""A compact decoder (Llama / Mistral / Qwen2) whose one-token step is made for CUDA-graph capture.

Built from a (possibly sparsified) `transformers` model, or with random weights from a named shape. Per decoder
block, the projections that share an input form one `Group` whose weights are stored once, transposed and
concatenated ([K, N], the layout the sparse GEMV reads): q|k|v, o, gate|up, down. Thresholds come from each
module's `SparseLinear.threshold` (threshold mode); a dense projection gets threshold -1 (every channel survives).

Two forward paths, one set of weights:
* `prefill(tokens)`    multi-token, plain PyTorch (masked `F.linear` on views of the same storage, SDPA); the
                       reference for every fast path and the CPU path.
* `step()`             one token for B rows at `self.pos`, the sparse GEMV custom op + the fused decode kernels on
                       CUDA (their PyTorch references on CPU), no host syncs; `wisparse.engine.generate` captures
                       it in a CUDA graph.
                       With `fused=True` (version 4, the default since run 6 measured it faster on all three named
                       shapes, dense and at 50%) the step makes q, k, v and the cache write inside the attention
                       split kernel, the attention combine writes o's survivor lists (batch 1), and every Triton
                       launch uses programmatic dependent launch (`pdl`). `fused=False`: version 3.

Shapes: B batch rows, T tokens, D hidden, H / Hkv heads, Dh head dim, I intermediate, V vocab, L cache length.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels import decode_ops as ops
from ..kernels import ops as kops  # also registers torch.ops.wisparse.sparse_gemv
from ..kernels.fused_mlp import counter_buffer, fused_mlp, mlp_supported
from ..kernels.sparse_gemv import HAVE_TRITON, launch_sparse_gemv, list_buffers

# Family adapters: where each family's RoPE class lives. Module names (q_proj ... down_proj) are shared.
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRotaryEmbedding"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RotaryEmbedding"),
}
GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
          "gu": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}
# Batch-1 survivor lists are written as LIST_SUBLISTS[group] sub-lists per GEMV segment (1, 2 or 4): the producer
# (norm for qkv and gu, silu_mul for down, the attention combine for o, whose sub-lists hold whole heads) runs one
# program per sub-list, and each GEMV program walks its segment's sub-lists as one list. Measured in the decode
# timeline (Llama-3.1-8B at 0.50, per layer): 4 sub-lists make o's combine 2.2 us instead of 4.3 and silu_mul 2.9
# instead of 4.7, for 0.8 / 0.6 us more in the o / down GEMVs (run 13); 2 sub-lists for q/k/v and gate/up make
# each norm 0.3 us faster at no cost in those GEMVs, while 4 cost them 2-3 us (run 14: 334.1 tok/s with this mix,
# 331.6 with q/k/v and gate/up whole, 331.2 with q/k/v at 4, 325.8 with every list whole).
LIST_SUBLISTS = {"qkv": 2, "gu": 2, "down": 4, "o": 4}


def list_sub(gname: str, kr: int, head_dim: int) -> int:
    """Sub-list size for group `gname` whose GEMV segments are kr channels: kr / 4 or kr / 2 (at least 128
    channels; for o whole heads) as LIST_SUBLISTS allows, else kr."""
    for r in (4, 2):
        sub = kr // r
        if r <= LIST_SUBLISTS[gname] and kr % r == 0 and sub >= 128 and (gname != "o" or sub % head_dim == 0):
            return sub
    return kr


@dataclass
class Group:
    """Projections sharing one input x [B, K]: weights wt [K, N] (N = sum(widths)), thresholds t [P, K] fp32."""
    wt: torch.Tensor
    widths: list[int]
    t: torch.Tensor
    bias: torch.Tensor | None = None
    positions: list[float] = field(default_factory=list)  # per projection; fraction of prefill positions masked
    sparse: bool = False                                  # any projection in threshold mode

    def view(self, p: int) -> torch.Tensor:
        """Projection p's weight as an [out, in] view of the shared storage (what F.linear takes)."""
        c0 = sum(self.widths[:p])
        return self.wt[:, c0:c0 + self.widths[p]].t()


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: Group
    o: Group
    gu: Group
    down: Group
    window: int = 0  # sliding window (0 = full attention)


def _threshold_of(mod, K: int, device) -> tuple[torch.Tensor, float, bool]:
    mode = getattr(mod, "mode", "dense")
    if mode == "topk":
        raise ValueError(f"{getattr(mod, 'name', mod)}: the decode engine supports threshold mode only "
                         "(top-k needs a per-token sort; use the accuracy path for top-k)")
    if mode == "threshold":
        pos = float(getattr(mod, "positions", 1.0))
        # rounded to the weight dtype: the reference compares |x| > t.to(x.dtype), the kernel compares in fp32
        t = mod.threshold.detach().to(device).reshape(K).to(mod.weight.dtype).float()
        return t, pos, True
    return torch.full((K,), -1.0, device=device), 0.0, False


def rope_tables(config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, Dh] fp32 from the family's own RoPE module (all rope types, attention scaling)."""
    mod, cls = FAMILIES[config.model_type]
    rot = getattr(importlib.import_module(mod), cls)(config)
    pos = torch.arange(length)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].float(), sin[0].float()


class Decoder:
    def __init__(self, config, embed, layers, norm, lm_head, dtype, device, fused: bool = True, pdl: bool = True,
                 tuned: bool = True):
        if config.model_type not in FAMILIES:
            raise ValueError(f"model type {config.model_type!r} not supported (supported: {', '.join(FAMILIES)})")
        self.config = config
        self.D = config.hidden_size
        self.H = config.num_attention_heads
        self.Hkv = config.num_key_value_heads
        self.Dh = getattr(config, "head_dim", None) or self.D // self.H
        self.I = config.intermediate_size
        self.V = config.vocab_size
        self.eps = config.rms_norm_eps
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        # lm_head [V, D]; when it is a view of a transposed [D, V] storage (untied heads), the dense Triton GEMV
        # reads it (faster than cuBLAS's GEMV on this shape); tied heads stay row-major for the embedding lookup
        self.lm_head_t = lm_head.t() if (lm_head.dim() == 2 and lm_head.t().is_contiguous()
                                         and lm_head.data_ptr() != embed.data_ptr()) else None
        self._dense_t = torch.full((1, self.D), -1.0, device=device)
        self.dtype, self.device = dtype, torch.device(device)
        self.sparse = True          # False: every group dense (thresholds ignored)
        self.backend = "triton"     # "triton": sparse GEMV op; "cublas": F.linear on the weight views
        self.meter = None           # [n_layers, 4, 3] float64 counts of dropped channels when set
        self.hook = None            # hook(layer, group, x [B, K]) in eager steps (calibration)
        self.fused = fused          # True: the version-4 step (`_step_fused`, default); False: version 3
        self.pdl = pdl              # version 4 on CUDA: programmatic dependent launch of its Triton kernels
        self.persistent_mlp = False  # version 5 (opt-in): batch-1 sparse MLP in one persistent launch
        self._mlp_counters: dict = {}  # its arrival counters by down's list segment (zero between launches)
        self._list_bufs: dict = {}  # (group name, segment) -> survivor-list buffers, shared by all layers
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.cos = self.sin = None
        self.B = self.L = 0
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # next position to write
        self.tokens = torch.zeros(1, dtype=torch.long, device=self.device)  # current input token per row [B]
        if tuned:  # the shipped launch configurations of this GPU generation, where none were set
            kops.install_tuned(self.device)

    # ------------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model, share_weights: bool = True, fused: bool = True, tuned: bool = True) -> "Decoder":
        """Read a `transformers` Llama/Mistral/Qwen2 model (SparseLinear modules in threshold mode are sparse).

        With `share_weights`, each group's weights are copied once into the transposed concatenated layout and the
        model's own parameters are re-pointed to views of it (F.linear works on them unchanged): one copy in memory.
        `fused`: the version-4 step (default; False: version 3, see the module docstring).
        """
        config = model.config
        core = model.model
        dtype = core.embed_tokens.weight.dtype
        device = core.embed_tokens.weight.device
        layers = []
        for i, blk in enumerate(core.layers):
            groups = {}
            for gname, (parent, names) in GROUPS.items():
                mods = [getattr(getattr(blk, parent), n) for n in names]
                K = mods[0].weight.shape[1]
                wt = torch.cat([m.weight.detach().t() for m in mods], dim=1).contiguous()
                widths = [m.weight.shape[0] for m in mods]
                info = [_threshold_of(m, K, device) for m in mods]
                t = torch.stack([i_[0] for i_ in info])
                biases = [getattr(m, "bias", None) for m in mods]
                bias = None
                if any(b is not None for b in biases):
                    bias = torch.cat([b.detach() if b is not None else torch.zeros(w, dtype=dtype, device=device)
                                      for b, w in zip(biases, widths)])
                g = Group(wt=wt, widths=widths, t=t, bias=bias, positions=[i_[1] for i_ in info],
                          sparse=any(i_[2] for i_ in info))
                if share_weights:
                    for p, m in enumerate(mods):
                        m.weight.data = g.view(p)
                groups[gname] = g
            window = _window(config, i)
            layers.append(Layer(ln1=blk.input_layernorm.weight.detach(), ln2=blk.post_attention_layernorm.weight.detach(),
                                window=window, **groups))
        lm_head = model.lm_head.weight.detach() if hasattr(model, "lm_head") else core.embed_tokens.weight.detach()
        if share_weights and lm_head.data_ptr() != core.embed_tokens.weight.data_ptr():
            lm_t = lm_head.t().contiguous()  # stored once, transposed; the model's head becomes a view of it
            model.lm_head.weight.data = lm_t.t()
            lm_head = model.lm_head.weight.detach()
        return cls(config, core.embed_tokens.weight.detach(), layers, core.norm.weight.detach(), lm_head, dtype, device,
                   fused=fused, tuned=tuned)

    @classmethod
    def random(cls, name_or_config, device="cuda", dtype=torch.bfloat16, seed: int = 0, num_layers: int | None = None,
               std: float = 0.02, fused: bool = True, tuned: bool = True) -> "Decoder":
        """Random weights (normal, std 0.02 like HF's initializer) for a named shape or a config; dense thresholds."""
        from .shapes import hf_config

        config = hf_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
        if num_layers is not None:
            config.num_hidden_layers = num_layers
            if getattr(config, "layer_types", None):
                config.layer_types = config.layer_types[:num_layers]
        gen = torch.Generator(device=device).manual_seed(seed)
        D, H, Hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        Dh = getattr(config, "head_dim", None) or D // H
        I = config.intermediate_size

        def rnd(*shape):
            return (torch.randn(*shape, device=device, dtype=dtype, generator=gen) * std)

        def group(K, widths, bias=False):
            return Group(wt=rnd(K, sum(widths)), widths=list(widths), t=torch.full((len(widths), K), -1.0, device=device),
                         bias=rnd(sum(widths)) if bias else None, positions=[1.0] * len(widths), sparse=False)

        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        layers = []
        for i in range(config.num_hidden_layers):
            layers.append(Layer(
                ln1=torch.ones(D, device=device, dtype=dtype), ln2=torch.ones(D, device=device, dtype=dtype),
                qkv=group(D, [H * Dh, Hkv * Dh, Hkv * Dh], qkv_bias), o=group(H * Dh, [D]),
                gu=group(D, [I, I]), down=group(I, [D]), window=_window(config, i)))
        embed = rnd(config.vocab_size, D)
        lm_head = embed if config.tie_word_embeddings else rnd(D, config.vocab_size).t()
        return cls(config, embed, layers, torch.ones(D, device=device, dtype=dtype), lm_head, dtype, device,
                   fused=fused, tuned=tuned)

    def groups(self):
        """(layer index, group name, Group) for every group, in order."""
        for i, lyr in enumerate(self.layers):
            for g in GROUPS:
                yield i, g, getattr(lyr, g)

    def set_thresholds(self, thresholds: dict[tuple[int, str], torch.Tensor]) -> None:
        """Copy new thresholds [P, K] into the groups in place (captured graphs see them)."""
        for (i, g), t in thresholds.items():
            grp = getattr(self.layers[i], g)
            grp.t.copy_(t.to(self.dtype).float())  # same rounding as the reference mask (t.to(x.dtype))
            grp.sparse = bool((t >= 0).any())
            grp.positions = [1.0 if float(r.max()) >= 0 else 0.0 for r in t]

    # ------------------------------------------------------------------------------------------------------------
    # cache
    # ------------------------------------------------------------------------------------------------------------
    def setup_cache(self, batch: int, length: int) -> None:
        """Static KV cache [B, Hkv, L, Dh] per layer and RoPE tables for L positions."""
        self.B, self.L = batch, length
        shape = (batch, self.Hkv, length, self.Dh)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        cos, sin = rope_tables(self.config, length)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------------------------------
    # reference path: multi-token prefill in plain PyTorch
    # ------------------------------------------------------------------------------------------------------------
    def _masked_linear(self, x: torch.Tensor, g: Group, p: int) -> torch.Tensor:
        c0 = sum(g.widths[:p])
        if self.sparse and g.sparse and g.positions[p] > 0:
            T = x.shape[-2]
            n = T if g.positions[p] >= 1.0 else int(math.ceil(g.positions[p] * T))
            xm = x * (x.abs() > g.t[p].to(x.dtype))
            x = torch.cat([x[..., : T - n, :], xm[..., T - n:, :]], dim=-2)
        b = g.bias[c0:c0 + g.widths[p]] if g.bias is not None else None
        return F.linear(x, g.view(p), b)

    def _rms(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, start: int = 0, hook=None) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> logits [B, T, V]; fills the cache; sets pos and tokens.

        `hook(layer, group_name, x)` (optional) sees each group's input x [B, T, K] (calibration, mask checks).
        """
        B, T = tokens.shape
        H, Hkv, Dh = self.H, self.Hkv, self.Dh
        cos = self.cos[start:start + T].to(self.dtype)
        sin = self.sin[start:start + T].to(self.dtype)

        def rope(x):  # [B, h, T, Dh]
            x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        h = F.embedding(tokens, self.embed)
        kpos = torch.arange(start + T, device=self.device)
        qpos = torch.arange(start, start + T, device=self.device)
        for i, lyr in enumerate(self.layers):
            x = self._rms(h, lyr.ln1)
            if hook:
                hook(i, "qkv", x)
            q = self._masked_linear(x, lyr.qkv, 0).view(B, T, H, Dh).transpose(1, 2)
            k = self._masked_linear(x, lyr.qkv, 1).view(B, T, Hkv, Dh).transpose(1, 2)
            v = self._masked_linear(x, lyr.qkv, 2).view(B, T, Hkv, Dh).transpose(1, 2)
            q, k = rope(q), rope(k)
            self.k_cache[i][:, :, start:start + T] = k
            self.v_cache[i][:, :, start:start + T] = v
            mask = kpos[None, :] <= qpos[:, None]
            if lyr.window > 0:
                mask &= kpos[None, :] > qpos[:, None] - lyr.window
            a = F.scaled_dot_product_attention(q, self.k_cache[i][:, :, : start + T], self.v_cache[i][:, :, : start + T],
                                               attn_mask=mask[None, None], enable_gqa=H != Hkv)
            a = a.transpose(1, 2).reshape(B, T, H * Dh)
            if hook:
                hook(i, "o", a)
            h = h + self._masked_linear(a, lyr.o, 0)
            x = self._rms(h, lyr.ln2)
            if hook:
                hook(i, "gu", x)
            m = F.silu(self._masked_linear(x, lyr.gu, 0)) * self._masked_linear(x, lyr.gu, 1)
            if hook:
                hook(i, "down", m)
            h = h + self._masked_linear(m, lyr.down, 0)
        logits = F.linear(self._rms(h, self.norm), self.lm_head)
        self.pos.fill_(start + T)
        self.tokens.copy_(tokens[:, -1])
        return logits

    # ------------------------------------------------------------------------------------------------------------
    # fast path: one decode step (CUDA-graph capturable: fixed shapes, device-side position, no host syncs)
    # ------------------------------------------------------------------------------------------------------------
    def _lists_for(self, i: int, gname: str):
        """(t, sub, buffers, config) when group `gname` of layer i reads survivor lists (sub-lists of `sub` channels)
        that the kernel producing its input writes (batch 1, sparse, a `listed` configuration: qkv and gu after
        add_rmsnorm, down after silu_mul, o after the attention combine in version 4); else None. Version 3's o
        GEMV compacts its input itself (the op's listed path)."""
        if i >= len(self.layers) or self.backend != "triton" or not self.sparse or self.tokens.shape[0] != 1:
            return None
        g = getattr(self.layers[i], gname)
        K, N = g.wt.shape
        cfg = kops.get_config(K, N, 1, False)
        if not (g.sparse and cfg.listed):
            return None
        # version 5's MLP kernel reads and writes whole segments
        whole = self.persistent_mlp and gname in ("gu", "down")
        sub = cfg.kr if whole else list_sub(gname, cfg.kr, self.Dh)
        key = (gname, sub)
        if key not in self._list_bufs:
            self._list_bufs[key] = list_buffers(len(g.widths), K, sub, self.device)
        return g.t, sub, self._list_bufs[key], cfg

    def _observe(self, i: int, gname: str, g: Group, x: torch.Tensor) -> None:
        """The calibration hook (eager only, never set while capturing) and the realised-sparsity meter."""
        if self.hook is not None:
            self.hook(i, gname, x)
        if self.meter is not None and self.sparse and g.sparse:
            self.meter[i, list(GROUPS).index(gname), : len(g.widths)] += (
                (x.abs().unsqueeze(1).float() <= g.t.unsqueeze(0)).sum(dim=(0, 2)).double())

    def _mlp(self, i: int, lyr: Layer, x: torch.Tensor, lst, pdl: bool) -> torch.Tensor:
        """gate|up GEMV, SiLU*mul, down GEMV -> down's partials. Version 5 (`persistent_mlp`, batch 1, both
        GEMVs listed): one persistent launch (`kernels.fused_mlp`); otherwise three launches."""
        dl = self._lists_for(i, "down")
        if self.persistent_mlp and lst is not None and dl is not None and mlp_supported(self.I, lst[3], dl[3]):
            if dl[1] not in self._mlp_counters:
                self._mlp_counters[dl[1]] = counter_buffer(self.I, dl[1], self.device)
            self._observe(i, "gu", lyr.gu, x)
            p, m = fused_mlp(lst[2], lyr.gu.wt, lyr.down.t, lyr.down.wt, lst[3], dl[3], dl[2],
                             self._mlp_counters[dl[1]], pdl=pdl)
            self._observe(i, "down", lyr.down, m)
            return p
        p = self._gemv(i, "gu", lyr.gu, x, lst, pdl)
        m = ops.silu_mul(p, self.I, self.dtype, lists=dl, pdl=pdl)
        return self._gemv(i, "down", lyr.down, m, dl, pdl)

    def _gemv(self, i: int, gname: str, g: Group, x: torch.Tensor, lists=None, pdl: bool = False) -> torch.Tensor:
        """x [B, K] -> partials [S, B, N] (fp32 from the sparse GEMV op, or [1, B, N] in dtype from cuBLAS).
        `lists` (from `_lists_for`): x's survivor lists, already written by the kernel that produced x.
        `pdl` (version 4, CUDA): the same kernel and configuration, launched directly with programmatic dependent
        launch instead of through the custom op."""
        sparse = self.sparse and g.sparse
        self._observe(i, gname, g, x)
        if self.backend == "cublas":
            if sparse:
                return torch.cat([F.linear(x * (x.abs() > g.t[p].to(x.dtype)), g.view(p))
                                  for p in range(len(g.widths))], dim=-1).unsqueeze(0)
            return F.linear(x, g.wt.t()).unsqueeze(0)
        if lists is not None:
            return kops.gemv_list(*lists[2], g.wt, g.widths, lists[3], pdl=pdl, sub=lists[1])
        if pdl and x.is_cuda and HAVE_TRITON:
            cfg = kops.get_config(g.wt.shape[0], g.wt.shape[1], x.shape[0], not sparse)
            return launch_sparse_gemv(x, g.wt, g.t, g.widths, dense=not sparse, config=cfg, pdl=True)
        return torch.ops.wisparse.sparse_gemv(x, g.wt, g.t, g.widths, not sparse)

    def step(self) -> torch.Tensor:
        """Decode one token per row: reads self.tokens [B] at self.pos, writes the cache; returns logits [B, V]."""
        if self.fused:
            return self._step_fused()
        h = F.embedding(self.tokens, self.embed)
        lst = self._lists_for(0, "qkv")
        x = ops.add_rmsnorm(h, None, self.layers[0].ln1, self.eps, lists=lst)
        n = len(self.layers)
        for i, lyr in enumerate(self.layers):
            p = self._gemv(i, "qkv", lyr.qkv, x, lst)
            q = ops.qkv_rope_cache(p, lyr.qkv.bias, self.cos, self.sin, self.pos, self.k_cache[i], self.v_cache[i],
                                   self.H, self.Hkv)
            a = ops.decode_attention(q, self.k_cache[i], self.v_cache[i], self.pos, lyr.window)
            p = self._gemv(i, "o", lyr.o, a)
            lst = self._lists_for(i, "gu")
            x = ops.add_rmsnorm(h, p, lyr.ln2, self.eps, lists=lst)
            p = self._gemv(i, "gu", lyr.gu, x, lst)
            lst = self._lists_for(i, "down")
            m = ops.silu_mul(p, self.I, self.dtype, lists=lst)
            p = self._gemv(i, "down", lyr.down, m, lst)
            lst = self._lists_for(i + 1, "qkv")
            x = ops.add_rmsnorm(h, p, self.layers[i + 1].ln1 if i + 1 < n else self.norm, self.eps, lists=lst)
        if self.backend == "triton" and self.lm_head_t is not None:
            return ops.sum_partials(torch.ops.wisparse.sparse_gemv(x, self.lm_head_t, self._dense_t, [self.V], True),
                                    x.dtype)
        return F.linear(x, self.lm_head)

    def _step_fused(self) -> torch.Tensor:
        """Version 4 (the default): `step` with attention in 2 launches (the split kernel sums the q|k|v partials, applies
        RoPE and writes the cache; the combine writes o's survivor lists at batch 1) and programmatic dependent
        launch between the Triton kernels. Batch 1 sparse: 9 launches per layer (version 3: 11)."""
        pdl = self.pdl and self.device.type == "cuda"
        h = F.embedding(self.tokens, self.embed)
        lst = self._lists_for(0, "qkv")
        x = ops.add_rmsnorm(h, None, self.layers[0].ln1, self.eps, lists=lst, pdl=pdl)
        n = len(self.layers)
        for i, lyr in enumerate(self.layers):
            p = self._gemv(i, "qkv", lyr.qkv, x, lst, pdl)
            lst = self._lists_for(i, "o")
            if lst is not None and lst[1] % self.Dh:  # the combine writes whole heads per list segment
                lst = None
            a = ops.attention_fused(p, lyr.qkv.bias, self.cos, self.sin, self.pos, self.k_cache[i], self.v_cache[i],
                                    self.H, self.Hkv, lyr.window, lists=lst, pdl=pdl)
            p = self._gemv(i, "o", lyr.o, a, lst, pdl)
            lst = self._lists_for(i, "gu")
            x = ops.add_rmsnorm(h, p, lyr.ln2, self.eps, lists=lst, pdl=pdl)
            p = self._mlp(i, lyr, x, lst, pdl)
            lst = self._lists_for(i + 1, "qkv")
            x = ops.add_rmsnorm(h, p, self.layers[i + 1].ln1 if i + 1 < n else self.norm, self.eps, lists=lst,
                                pdl=pdl)
        if self.backend == "triton" and self.lm_head_t is not None:
            if pdl and HAVE_TRITON:
                cfg = kops.get_config(self.D, self.V, x.shape[0], True)
                p = launch_sparse_gemv(x, self.lm_head_t, self._dense_t, [self.V], dense=True, config=cfg, pdl=True)
            else:
                p = torch.ops.wisparse.sparse_gemv(x, self.lm_head_t, self._dense_t, [self.V], True)
            return ops.sum_partials(p, x.dtype, pdl=pdl)
        return F.linear(x, self.lm_head)

    def param_counts(self) -> dict[tuple[int, str], list[int]]:
        """numel of each projection (from the stored weights), for parameter-weighted sparsity."""
        return {(i, g): [grp.wt.shape[0] * w for w in grp.widths] for i, g, grp in self.groups()}


def _window(config, i: int) -> int:
    sw = getattr(config, "sliding_window", None)
    if not sw:
        return 0
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(sw) if types[i] == "sliding_attention" else 0
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return 0
    return int(sw)
