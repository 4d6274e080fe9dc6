"""The small fused kernels of one decode step (Triton), each with a PyTorch reference of the same semantics.

They take the sparse GEMV's fp32 split-K partials [S, B, N] directly, so summing the partials costs no extra
launch. Rounding points follow `transformers` (projection outputs, residual adds and norms round to the model
dtype where HF rounds).

* add_rmsnorm(h, partials, w, eps)   -> h += round(sum(partials)) (in place); returns rmsnorm(h) * w
  (two launches: residual add + slice sums of squares over many programs, then norm + lists per segment)
* qkv_rope_cache(partials, bias, cos, sin, pos, k_cache, v_cache, H, Hkv) -> q [B, H, D] (RoPE'd); writes k, v
* decode_attention(q, k_cache, v_cache, pos, window) -> o [B, H*D]   (flash-decoding: split over keys + combine)
* silu_mul(partials, I) -> round(silu(round(gate))) * round(up)      (gate|up fused partials [S, B, 2I])
* attention_fused(partials, ...) -> o [B, H*D]   version 4 (opt-in): qkv_rope_cache folded into the attention
  split kernel, and (batch 1) o's survivor lists written by the combine kernel: 2 launches instead of 4

`pdl=True` (version 4) launches with programmatic dependent launch (see `sparse_gemv._pdl_enter`).

add_rmsnorm and silu_mul can also write, for batch 1, the survivor lists of their output for the next sparse GEMV
(`lists=(t [P, K], seg, (idx, xv, cnt))`, see `sparse_gemv.list_buffers`): the threshold test and the compaction
happen where x is produced, once, instead of in every GEMV program or in an extra launch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sparse_gemv import HAVE_TRITON, pdl_kwargs, reference_compact

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .sparse_gemv import _pdl_enter, _store_list


def _use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


def _np2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------
def ref_add_rmsnorm(h, partials, w, eps):
    if partials is not None:
        h.copy_((h.float() + partials.sum(0).to(h.dtype).float()).to(h.dtype))
    hf = h.float()
    xn = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return w * xn


def ref_qkv_rope_cache(partials, bias, cos, sin, pos, k_cache, v_cache, H, Hkv):
    B = partials.shape[1]
    D = k_cache.shape[-1]
    y = partials.sum(0)
    if bias is not None:
        y = y + bias.float()
    y = y.to(k_cache.dtype)
    q = y[:, : H * D].view(B, H, D)
    k = y[:, H * D: (H + Hkv) * D].view(B, Hkv, D)
    v = y[:, (H + Hkv) * D:].view(B, Hkv, D)
    p = pos.reshape(-1)[:1].long()
    c = cos.index_select(0, p).to(q.dtype)  # [1, D]
    s = sin.index_select(0, p).to(q.dtype)

    def rot(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    k_cache.index_copy_(2, p, rot(k).unsqueeze(2))
    v_cache.index_copy_(2, p, v.unsqueeze(2))
    return rot(q)


def ref_decode_attention(q, k_cache, v_cache, pos, window: int = 0):
    B, H, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    p = pos.reshape(-1)[:1]
    kpos = torch.arange(L, device=q.device)
    valid = kpos <= p
    if window > 0:
        valid &= kpos > p - window
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=valid.view(1, 1, 1, L),
                                       enable_gqa=H != Hkv)
    return o.reshape(B, H * D)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _residual_add(h_ptr, p_ptr, b, B, D, offs, m, S: tl.constexpr, HAS_P: tl.constexpr):
        """h[b] at offs, plus (HAS_P) round(sum of the S fp32 partial rows), stored back; returns it."""
        h = tl.load(h_ptr + b * D + offs, mask=m, other=0.0)
        if HAS_P:
            acc = tl.load(p_ptr + b * D + offs, mask=m, other=0.0)
            for s in tl.static_range(1, S):  # unrolled: all partial rows in flight at once
                acc += tl.load(p_ptr + (s * B + b) * D + offs, mask=m, other=0.0)
            h = (h.to(tl.float32) + acc.to(h.dtype).to(tl.float32)).to(h.dtype)
            tl.store(h_ptr + b * D + offs, h, mask=m)
        return h

    @triton.jit
    def _norm_scale(h, rstd, w_ptr, offs, m):
        """y = w * round(h * rstd), rounded where transformers rounds."""
        xn = (h.to(tl.float32) * rstd).to(h.dtype)
        w = tl.load(w_ptr + offs, mask=m, other=0.0)
        return (w.to(tl.float32) * xn.to(tl.float32)).to(h.dtype)

    @triton.jit
    def _list_for(y, p, t_ptr, idx_ptr, xv_ptr, cnt_ptr, D, NSEG, offs, m, seg, SEG: tl.constexpr):
        """Survivor list p of y (segments seg) against projection p's thresholds."""
        t = tl.load(t_ptr + p * D + offs, mask=m, other=float("inf"))
        keep = tl.abs(y.to(tl.float32)) > t
        _store_list(y, keep, offs, seg, seg < NSEG, p * D, p * NSEG, idx_ptr, xv_ptr, cnt_ptr, SEG)

    @triton.jit
    def _add_rmsnorm_kernel(h_ptr, p_ptr, w_ptr, out_ptr, t_ptr, idx_ptr, xv_ptr, cnt_ptr, B, D, NSEG, eps,
                            S: tl.constexpr, HAS_P: tl.constexpr, NS: tl.constexpr, SEG: tl.constexpr,
                            P_LIST: tl.constexpr, PDL: tl.constexpr = False):
        """One program per row; the row is held as [NS, SEG] (segments of the survivor lists when P_LIST > 0)."""
        _pdl_enter(PDL)
        b = tl.program_id(0)
        seg = tl.arange(0, NS)
        offs = seg[:, None] * SEG + tl.arange(0, SEG)[None, :]
        m = offs < D
        h = _residual_add(h_ptr, p_ptr, b, B, D, offs, m, S, HAS_P)
        hf = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(hf * hf, axis=1), axis=0) / D + eps)
        y = _norm_scale(h, rstd, w_ptr, offs, m)
        tl.store(out_ptr + b * D + offs, y, mask=m)
        for p in tl.static_range(P_LIST):  # batch 1: survivor lists of y for each projection's thresholds
            _list_for(y, p, t_ptr, idx_ptr, xv_ptr, cnt_ptr, D, NSEG, offs, m, seg, SEG)

    @triton.jit
    def _add_sumsq_kernel(h_ptr, p_ptr, ss_ptr, B, D, NB, S: tl.constexpr, HAS_P: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Split norm, launch 1 of 2. Program (b, j): channels [j*BLOCK, (j+1)*BLOCK) of row b; h += round(sum of
        the S partials) (stored), and the slice's sum of squares -> ss[b, j]. Many small programs instead of one
        program per row: the one-program kernel reads all S partial rows from a single SM (10-13 us on the H200)."""
        _pdl_enter(PDL)
        b = tl.program_id(0)
        j = tl.program_id(1)
        offs = j * BLOCK + tl.arange(0, BLOCK)
        m = offs < D
        hf = _residual_add(h_ptr, p_ptr, b, B, D, offs, m, S, HAS_P).to(tl.float32)
        tl.store(ss_ptr + b * NB + j, tl.sum(hf * hf, axis=0))

    @triton.jit
    def _norm_lists_kernel(h_ptr, ss_ptr, w_ptr, out_ptr, t_ptr, idx_ptr, xv_ptr, cnt_ptr, B, D, NB, NSEG, eps,
                           NB_P2: tl.constexpr, SEG: tl.constexpr, P_LIST: tl.constexpr, PDL: tl.constexpr = False):
        """Split norm, launch 2 of 2. Program (b, s, p): rstd of row b from its NB slice sums; segment s of
        y = w * round(h * rstd) -> out (p == 0), and (P_LIST > 0, batch 1) list p's segment s."""
        _pdl_enter(PDL)
        b = tl.program_id(0)
        s = tl.program_id(1)
        p = tl.program_id(2)
        jb = tl.arange(0, NB_P2)
        ss = tl.load(ss_ptr + b * NB + jb, mask=jb < NB, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
        seg = s + tl.arange(0, 1)
        offs = seg[:, None] * SEG + tl.arange(0, SEG)[None, :]
        m = offs < D
        y = _norm_scale(tl.load(h_ptr + b * D + offs, mask=m, other=0.0), rstd, w_ptr, offs, m)
        tl.store(out_ptr + b * D + offs, y, mask=m & (p == 0))
        if P_LIST > 0:
            _list_for(y, p, t_ptr, idx_ptr, xv_ptr, cnt_ptr, D, NSEG, offs, m, seg, SEG)

    @triton.jit
    def _qkv_rope_cache_kernel(p_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr,
                               B, N, H, HKV, L, S: tl.constexpr,
                               HAS_BIAS: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)  # 0..H-1 q heads, then H..H+HKV-1 k heads, then v heads
        HALF: tl.constexpr = D // 2
        o1 = tl.arange(0, HALF)
        c0 = head * D
        a1 = tl.zeros((HALF,), dtype=tl.float32)
        a2 = tl.zeros((HALF,), dtype=tl.float32)
        for s in tl.static_range(S):
            base = p_ptr + (s * B + b) * N + c0
            a1 += tl.load(base + o1)
            a2 += tl.load(base + HALF + o1)
        if HAS_BIAS:
            a1 += tl.load(bias_ptr + c0 + o1).to(tl.float32)
            a2 += tl.load(bias_ptr + c0 + HALF + o1).to(tl.float32)
        dt = q_ptr.dtype.element_ty
        x1 = a1.to(dt).to(tl.float32)
        x2 = a2.to(dt).to(tl.float32)
        pos = tl.load(pos_ptr)
        if head < H + HKV:
            c1 = tl.load(cos_ptr + pos * D + o1).to(dt).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * D + o1).to(dt).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * D + HALF + o1).to(dt).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * D + HALF + o1).to(dt).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
            if head < H:
                qb = q_ptr + (b * H + head) * D
                tl.store(qb + o1, y1.to(dt))
                tl.store(qb + HALF + o1, y2.to(dt))
            else:
                kb = kc_ptr + ((b * HKV + (head - H)) * L + pos) * D
                tl.store(kb + o1, y1.to(dt))
                tl.store(kb + HALF + o1, y2.to(dt))
        else:
            vb = vc_ptr + ((b * HKV + (head - H - HKV)) * L + pos) * D
            tl.store(vb + o1, x1.to(dt))
            tl.store(vb + HALF + o1, x2.to(dt))

    @triton.jit
    def _attn_split_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,
                           H, HKV, L, scale, window, SPLIT_L,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)  # b * HKV + kv head
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        b = bh // HKV
        hk = bh % HKV
        pos = tl.load(pos_ptr).to(tl.int32)
        lo = sp * SPLIT_L
        hi = tl.minimum(lo + SPLIT_L, pos + 1)
        if window > 0:
            lo = tl.maximum(lo, pos - window + 1)
        g = tl.arange(0, BLOCK_G)
        gm = g < G
        d = tl.arange(0, D)
        q = tl.load(q_ptr + ((b * H + hk * G + g) * D)[:, None] + d[None, :], mask=gm[:, None], other=0.0)
        _attn_keys(q, kc_ptr, vc_ptr, m_ptr, l_ptr, acc_ptr, bh, sp, nsp, lo, hi, L, scale, BLOCK_G, BLOCK_L, D)

    @triton.jit
    def _attn_keys(q, kc_ptr, vc_ptr, m_ptr, l_ptr, acc_ptr, bh, sp, nsp, lo, hi, L, scale,
                   BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr):
        """Online softmax of q [BLOCK_G, D] over keys [lo, hi) of cache row bh; writes m, l, acc of split sp."""
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
        kbase = kc_ptr + bh.to(tl.int64) * L * D
        vbase = vc_ptr + bh.to(tl.int64) * L * D
        for start in range(lo, hi, BLOCK_L):
            kk = start + tl.arange(0, BLOCK_L)
            km = kk < hi
            k = tl.load(kbase + kk[:, None] * D + d[None, :], mask=km[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(km[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            v = tl.load(vbase + kk[:, None] * D + d[None, :], mask=km[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        ob = (bh * nsp + sp) * BLOCK_G + g
        tl.store(m_ptr + ob, m_i)
        tl.store(l_ptr + ob, l_i)
        tl.store(acc_ptr + ob[:, None] * D + d[None, :], acc)

    @triton.jit
    def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, H, HKV, NSP,
                             G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
                             PDL: tl.constexpr = False):
        _pdl_enter(PDL)
        bh = tl.program_id(0)
        gi = tl.program_id(1)
        b = bh // HKV
        hk = bh % HKV
        sp = tl.arange(0, BLOCK_S)
        smask = sp < NSP
        idx = (bh * NSP + sp) * BLOCK_G + gi
        m = tl.load(m_ptr + idx, mask=smask, other=float("-inf"))
        l = tl.load(l_ptr + idx, mask=smask, other=0.0)
        mx = tl.max(m, axis=0)
        wgt = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + idx[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        num = tl.sum(acc * wgt[:, None], axis=0)
        den = tl.sum(l * wgt, axis=0)
        out = num / den
        tl.store(o_ptr + (b * H + hk * G + gi) * D + d, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(p_ptr, out_ptr, t_ptr, idx_ptr, xv_ptr, cnt_ptr, B, I, NSEG, S: tl.constexpr,
                         BLOCK: tl.constexpr, LIST: tl.constexpr, PDL: tl.constexpr = False):
        """Program (b, j): channels [j*BLOCK, (j+1)*BLOCK) of row b; with LIST (batch 1) also list segment j."""
        _pdl_enter(PDL)
        b = tl.program_id(0)
        seg = tl.program_id(1) + tl.arange(0, 1)
        offs = seg[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        m = offs < I
        g = tl.zeros((1, BLOCK), dtype=tl.float32)
        u = tl.zeros((1, BLOCK), dtype=tl.float32)
        for s in tl.static_range(S):
            base = p_ptr + (s * B + b) * 2 * I
            g += tl.load(base + offs, mask=m, other=0.0)
            u += tl.load(base + I + offs, mask=m, other=0.0)
        dt = out_ptr.dtype.element_ty
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (a * u).to(dt)
        tl.store(out_ptr + b * I + offs, y, mask=m)
        if LIST:
            t = tl.load(t_ptr + offs, mask=m, other=float("inf"))
            keep = tl.abs(y.to(tl.float32)) > t
            _store_list(y, keep, offs, seg, seg < NSEG, 0, 0, idx_ptr, xv_ptr, cnt_ptr, BLOCK)


    # ------------------------------------------------------------------------------------------------------------
    # version 4 (opt-in): attention absorbs qkv_rope_cache, and (batch 1) the compaction of o's input
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _qkv_rope_rows(p_ptr, stride_s, bias_ptr, cos_ptr, sin_ptr, pos, col0, rmask, S: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, D: tl.constexpr, dt: tl.constexpr):
        """Rows [R, D] of one token's q / k / v from the fp32 partials (partial s at p_ptr + s * stride_s, row r at
        columns col0[r] + [0, D)), with qkv_rope_cache's rounding: sum, + bias, round to dt, RoPE (ROPE) in fp32.
        The rotate-half partner (column (d + D/2) % D) is summed in the same order, so it is the same number."""
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, D)
        rot = (d + HALF) % D
        x = tl.zeros((col0.shape[0], D), dtype=tl.float32)
        xr = tl.zeros((col0.shape[0], D), dtype=tl.float32)
        for s in tl.static_range(S):  # unrolled: all partial rows in flight at once
            x += tl.load(p_ptr + s * stride_s + col0[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
            xr += tl.load(p_ptr + s * stride_s + col0[:, None] + rot[None, :], mask=rmask[:, None], other=0.0)
        if HAS_BIAS:
            x += tl.load(bias_ptr + col0[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            xr += tl.load(bias_ptr + col0[:, None] + rot[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        x = x.to(dt).to(tl.float32)
        xr = xr.to(dt).to(tl.float32)
        if ROPE:
            c = tl.load(cos_ptr + pos * D + d).to(dt).to(tl.float32)[None, :]
            sn = tl.load(sin_ptr + pos * D + d).to(dt).to(tl.float32)[None, :]
            x = tl.where((d < HALF)[None, :], x * c - xr * sn, x * c + xr * sn)
        return x

    @triton.jit
    def _attn_qkv_split_kernel(p_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, m_ptr, l_ptr, acc_ptr,
                               B, N, H, HKV, L, scale, window, SPLIT_L,
                               S: tl.constexpr, HAS_BIAS: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                               BLOCK_L: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr = False):
        """_attn_split_kernel that makes its own q from the qkv partials; the program whose key range holds pos
        also makes k, v and writes them into the caches (then a CTA barrier: its key loop reads them back)."""
        _pdl_enter(PDL)
        bh = tl.program_id(0)  # b * HKV + kv head
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        b = bh // HKV
        hk = bh % HKV
        dt = kc_ptr.dtype.element_ty
        pos = tl.load(pos_ptr).to(tl.int32)
        g = tl.arange(0, BLOCK_G)
        q = _qkv_rope_rows(p_ptr + b * N, B * N, bias_ptr, cos_ptr, sin_ptr, pos, (hk * G + g) * D, g < G, S,
                           HAS_BIAS, True, D, dt).to(dt)
        lo = sp * SPLIT_L
        if (pos >= lo) & (pos < lo + SPLIT_L):
            one = tl.arange(0, 1)
            ok = one < 1
            d = tl.arange(0, D)
            row = ((bh * L + pos) * D + d)[None, :]
            k = _qkv_rope_rows(p_ptr + b * N, B * N, bias_ptr, cos_ptr, sin_ptr, pos, (H + hk) * D + one * 0, ok,
                               S, HAS_BIAS, True, D, dt)
            v = _qkv_rope_rows(p_ptr + b * N, B * N, bias_ptr, cos_ptr, sin_ptr, pos, (H + HKV + hk) * D + one * 0,
                               ok, S, HAS_BIAS, False, D, dt)
            tl.store(kc_ptr + row, k.to(dt))
            tl.store(vc_ptr + row, v.to(dt))
            tl.debug_barrier()  # the cache rows at pos are read by this CTA's key loop below
        hi = tl.minimum(lo + SPLIT_L, pos + 1)
        if window > 0:
            lo = tl.maximum(lo, pos - window + 1)
        _attn_keys(q, kc_ptr, vc_ptr, m_ptr, l_ptr, acc_ptr, bh, sp, nsp, lo, hi, L, scale, BLOCK_G, BLOCK_L, D)

    @triton.jit
    def _attn_combine_list_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, t_ptr, idx_ptr, xv_ptr, cnt_ptr, H, NSP, NSEG,
                                  G: tl.constexpr, BLOCK_G: tl.constexpr, NH: tl.constexpr, D: tl.constexpr,
                                  BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
        """Batch 1. Program s: query heads [s*NH, (s+1)*NH), i.e. o channels [s*NH*D, (s+1)*NH*D) = list segment s
        of o's input: combines the splits, writes o and the segment's survivor list (thresholds t [1, H*D]).
        Every split's m, l and acc are loaded at once ([BLOCK_S, NH(, D)] tiles): a loop over the splits made two
        dependent L2 round trips per split (5.0 us per layer in the decode timeline of run 11, against 1.1 us for
        the combine without lists)."""
        _pdl_enter(PDL)
        s = tl.program_id(0)
        hq = s * NH + tl.arange(0, NH)
        hm = hq < H
        sp = tl.arange(0, BLOCK_S)
        r = ((hq // G) * NSP * BLOCK_G + hq % G)[None, :] + (sp * BLOCK_G)[:, None]  # split-kernel rows [BS, NH]
        rm = (sp < NSP)[:, None] & hm[None, :]
        m = tl.load(m_ptr + r, mask=rm, other=float("-inf"))
        mx = tl.max(m, axis=0)
        wgt = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(hm, mx, 0.0)[None, :]))
        den = tl.sum(tl.load(l_ptr + r, mask=rm, other=0.0) * wgt, axis=0)
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + r[:, :, None] * D + d[None, None, :], mask=rm[:, :, None], other=0.0)
        num = tl.sum(acc * wgt[:, :, None], axis=0)
        y = (num / tl.where(hm, den, 1.0)[:, None]).to(o_ptr.dtype.element_ty)
        offs = hq[:, None] * D + d[None, :]
        tl.store(o_ptr + offs, y, mask=hm[:, None])
        yf = tl.reshape(y, (1, NH * D))
        of = tl.reshape(offs, (1, NH * D))
        seg = s + tl.arange(0, 1)
        t = tl.load(t_ptr + of, mask=of < H * D, other=float("inf"))
        keep = tl.abs(yf.to(tl.float32)) > t
        _store_list(yf, keep, of, seg, seg < NSEG, 0, 0, idx_ptr, xv_ptr, cnt_ptr, NH * D)

    @triton.jit
    def _sum_partials_kernel(p_ptr, out_ptr, M, S: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """out[j] = sum over s of p[s, j] (fp32, in s order), rounded to out's dtype; M = B * N elements."""
        _pdl_enter(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < M
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(S):  # unrolled: every partial row in flight at once
            acc += tl.load(p_ptr + s * M + offs, mask=m, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


    @triton.jit
    def _argmax_blocks_kernel(x_ptr, val_ptr, idx_ptr, N, NBLK, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Program (b, j): the maximum of row b's block j and its first index."""
        _pdl_enter(PDL)
        b = tl.program_id(0)
        j = tl.program_id(1)
        offs = j * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + b * N + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
        tl.store(val_ptr + b * NBLK + j, tl.max(x, axis=0))
        tl.store(idx_ptr + b * NBLK + j, j * BLOCK + tl.argmax(x, axis=0, tie_break_left=True))

    @triton.jit
    def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, tok_ptr, gen_ptr, step_ptr, pos_ptr, B, NBLK, MAX_NEW,
                             BLOCK_B: tl.constexpr, BLOCK: tl.constexpr, ADVANCE: tl.constexpr,
                             PDL: tl.constexpr = False):
        """One program, all rows: row b's first block holding its maximum -> that block's index (torch.argmax's
        first occurrence) -> out[b]. ADVANCE (the greedy loop's bookkeeping, which took four torch launches):
        also tokens[b] and gen[b, min(step, MAX_NEW - 1)] = that index, then step += 1 and pos += 1."""
        _pdl_enter(PDL)
        rb = tl.arange(0, BLOCK_B)
        r = tl.arange(0, BLOCK)
        bm = rb < B
        v = tl.load(val_ptr + rb[:, None] * NBLK + r[None, :], mask=bm[:, None] & (r < NBLK)[None, :],
                    other=float("-inf"))
        best = tl.argmax(v, axis=1, tie_break_left=True)
        nxt = tl.load(idx_ptr + rb * NBLK + best, mask=bm, other=0).to(tl.int64)
        tl.store(out_ptr + rb, nxt, mask=bm)
        if ADVANCE:
            step = tl.load(step_ptr)
            pos = tl.load(pos_ptr)
            tl.store(tok_ptr + rb, nxt, mask=bm)
            tl.store(gen_ptr + rb * MAX_NEW + tl.minimum(step, MAX_NEW - 1), nxt, mask=bm)
            tl.debug_barrier()  # every thread has read step and pos before they move on
            tl.store(step_ptr, step + 1)
            tl.store(pos_ptr, pos + 1)


# ----------------------------------------------------------------------------------------------------------------
# dispatchers
# ----------------------------------------------------------------------------------------------------------------
# The norm kernel: "split" = two launches of many small programs (`_add_sumsq_kernel` + `_norm_lists_kernel`),
# "row" = the version-3 kernel, one program per row (kept for the benchmark's side-by-side rows).
NORM_MODE = "split"
SUMSQ_BLOCK = 256  # channels per program of the split norm's first launch (D = 4096: 16 programs)


def add_rmsnorm(h: torch.Tensor, partials: torch.Tensor | None, w: torch.Tensor, eps: float,
                lists: tuple | None = None, pdl: bool = False, mode: str | None = None) -> torch.Tensor:
    """h [B, D] (updated in place with the summed partials), returns rmsnorm(h) * w in h's dtype.
    lists = (t [P, D] fp32, seg, (idx, xv, cnt)): batch 1 only; also writes the survivor lists of the result.
    mode: "split" or "row" (see `NORM_MODE`, the default)."""
    if not _use_triton(h):
        out = ref_add_rmsnorm(h, partials, w, eps)
        if lists is not None:
            reference_compact(out, lists[0], lists[1], lists[2])
        return out
    mode = mode or NORM_MODE
    assert mode in ("split", "row"), f"unknown norm mode {mode!r}"
    B, D = h.shape
    out = torch.empty_like(h)
    S = partials.shape[0] if partials is not None else 0
    t, (idx, xv, cnt) = (lists[0], lists[2]) if lists is not None else (h, (h, h, h))
    P = t.shape[0] if lists is not None else 0
    p_arg = partials if partials is not None else h
    if mode == "split":
        seg = lists[1] if lists is not None else 1024
        nseg = math.ceil(D / seg)
        assert lists is None or (B == 1 and t.shape == (P, D) and cnt.shape == (P, nseg))
        nb = math.ceil(D / SUMSQ_BLOCK)
        ss = torch.empty((B, nb), device=h.device, dtype=torch.float32)
        _add_sumsq_kernel[(B, nb)](h, p_arg, ss, B, D, nb, S=S, HAS_P=partials is not None, BLOCK=SUMSQ_BLOCK,
                                   num_warps=2, **pdl_kwargs(pdl))
        _norm_lists_kernel[(B, nseg, max(P, 1))](h, ss, w, out, t, idx, xv, cnt, B, D, nb, nseg, eps,
                                                 NB_P2=_np2(nb), SEG=seg, P_LIST=P,
                                                 num_warps=4 if seg <= 1024 else 8, **pdl_kwargs(pdl))
        return out
    seg = lists[1] if lists is not None else _np2(D)
    ns = _np2(math.ceil(D / seg))
    assert lists is None or (B == 1 and t.shape == (P, D) and cnt.shape == (P, math.ceil(D / seg)))
    _add_rmsnorm_kernel[(B,)](h, p_arg, w, out, t, idx, xv, cnt, B, D,
                              math.ceil(D / seg), eps, S=S, HAS_P=partials is not None, NS=ns, SEG=seg, P_LIST=P,
                              num_warps=16 if D >= 4096 else 8, **pdl_kwargs(pdl))
    return out


def qkv_rope_cache(partials, bias, cos, sin, pos, k_cache, v_cache, H: int, Hkv: int) -> torch.Tensor:
    """partials [S, B, (H+2Hkv)*D] -> q [B, H, D] roped; k (roped) and v written at `pos` of the caches."""
    if not _use_triton(partials):
        return ref_qkv_rope_cache(partials, bias, cos, sin, pos, k_cache, v_cache, H, Hkv)
    S, B, N = partials.shape
    D = k_cache.shape[-1]
    q = torch.empty((B, H, D), device=partials.device, dtype=k_cache.dtype)
    _qkv_rope_cache_kernel[(B, H + 2 * Hkv)](
        partials, bias if bias is not None else partials, cos, sin, pos, q, k_cache, v_cache,
        B, N, H, Hkv, k_cache.shape[2], S=S, HAS_BIAS=bias is not None, D=D, num_warps=1)
    return q


def _split_len(L: int) -> int:
    """Keys per split: <= 64 splits of >= 64 keys (enough programs at short and long contexts)."""
    return max(64, _np2(math.ceil(L / 64)))


def decode_attention(q, k_cache, v_cache, pos, window: int = 0, split_l: int | None = None) -> torch.Tensor:
    """q [B, H, D], caches [B, Hkv, L, D]; keys 0..pos (and > pos - window) -> o [B, H*D]."""
    if not _use_triton(q):
        return ref_decode_attention(q, k_cache, v_cache, pos, window)
    B, H, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    BG = max(16, _np2(G))
    if split_l is None:
        split_l = _split_len(L)
    nsp = math.ceil(L / split_l)
    m = torch.empty((B * Hkv * nsp * BG,), device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty((B * Hkv * nsp * BG, D), device=q.device, dtype=torch.float32)
    _attn_split_kernel[(B * Hkv, nsp)](q, k_cache, v_cache, pos, m, lsum, acc, H, Hkv, L, D ** -0.5,
                                       window, split_l, G=G, BLOCK_G=BG, BLOCK_L=64, D=D, num_warps=4)
    o = torch.empty((B, H * D), device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(B * Hkv, G)](m, lsum, acc, o, H, Hkv, nsp, G=G, BLOCK_G=BG,
                                       BLOCK_S=max(2, _np2(nsp)), D=D, num_warps=4)
    return o


def silu_mul(partials: torch.Tensor, I: int, dtype: torch.dtype, lists: tuple | None = None,
             pdl: bool = False) -> torch.Tensor:
    """partials [S, B, 2I] (gate | up) -> round(silu(round(g))) * round(u) [B, I] in dtype.
    lists = (t [1, I] fp32, seg, (idx, xv, cnt)): batch 1 only; also writes the survivor lists of the result."""
    if not _use_triton(partials):
        y = partials.sum(0).to(dtype)
        out = F.silu(y[:, :I]) * y[:, I:]
        if lists is not None:
            reference_compact(out, lists[0], lists[1], lists[2])
        return out
    S, B, _ = partials.shape
    out = torch.empty((B, I), device=partials.device, dtype=dtype)
    BLOCK = lists[1] if lists is not None else 1024
    t, (idx, xv, cnt) = (lists[0], lists[2]) if lists is not None else (out, (out, out, out))
    assert lists is None or (B == 1 and t.shape == (1, I) and cnt.shape == (1, math.ceil(I / BLOCK)))
    _silu_mul_kernel[(B, math.ceil(I / BLOCK))](partials, out, t, idx, xv, cnt, B, I, math.ceil(I / BLOCK), S=S,
                                                BLOCK=BLOCK, LIST=lists is not None,
                                                num_warps=4 if BLOCK <= 1024 else 8, **pdl_kwargs(pdl))
    return out


def attention_fused(partials: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                    pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, H: int, Hkv: int,
                    window: int = 0, lists: tuple | None = None, pdl: bool = False,
                    split_l: int | None = None) -> torch.Tensor:
    """Version 4: qkv_rope_cache + decode_attention in 2 launches (split kernel makes q, k, v itself; combine).
    partials [S, B, (H+2Hkv)*D] -> o [B, H*D]; k, v written at pos. lists = (t [1, H*D], seg, (idx, xv, cnt), ...)
    (batch 1, seg a multiple of D): the combine also writes the survivor lists of o (o's listed GEMV input)."""
    if not _use_triton(partials):
        q = ref_qkv_rope_cache(partials, bias, cos, sin, pos, k_cache, v_cache, H, Hkv)
        o = ref_decode_attention(q, k_cache, v_cache, pos, window)
        if lists is not None:
            reference_compact(o, lists[0], lists[1], lists[2])
        return o
    S, B, N = partials.shape
    Hkv_, L, D = k_cache.shape[1:]
    G = H // Hkv
    BG = max(16, _np2(G))
    split_l = split_l or _split_len(L)
    nsp = math.ceil(L / split_l)
    m = torch.empty((B * Hkv * nsp * BG,), device=partials.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty((B * Hkv * nsp * BG, D), device=partials.device, dtype=torch.float32)
    kw = pdl_kwargs(pdl)
    _attn_qkv_split_kernel[(B * Hkv, nsp)](
        partials, bias if bias is not None else partials, cos, sin, pos, k_cache, v_cache, m, lsum, acc,
        B, N, H, Hkv, L, D ** -0.5, window, split_l, S=S, HAS_BIAS=bias is not None, G=G, BLOCK_G=BG, BLOCK_L=64,
        D=D, num_warps=4, **kw)
    o = torch.empty((B, H * D), device=partials.device, dtype=k_cache.dtype)
    if lists is None:
        _attn_combine_kernel[(B * Hkv, G)](m, lsum, acc, o, H, Hkv, nsp, G=G, BLOCK_G=BG,
                                           BLOCK_S=max(2, _np2(nsp)), D=D, num_warps=4, **kw)
        return o
    t, seg, (idx, xv, cnt) = lists[0], lists[1], lists[2]
    assert B == 1 and seg % D == 0 and t.shape == (1, H * D) and cnt.shape == (1, math.ceil(H * D / seg))
    _attn_combine_list_kernel[(cnt.shape[1],)](m, lsum, acc, o, t, idx, xv, cnt, H, nsp, cnt.shape[1], G=G,
                                               BLOCK_G=BG, NH=seg // D, D=D, BLOCK_S=max(2, _np2(nsp)),
                                               num_warps=4 if seg <= 1024 else 8, **kw)
    return o


def sum_partials(partials: torch.Tensor, dtype: torch.dtype, pdl: bool = False) -> torch.Tensor:
    """fp32 partials [S, B, N] -> their sum [B, N] in dtype (the lm_head's logits). One Triton launch of many
    programs with PDL (2.5-3 us in the decode timeline; `partials.sum(0).to(dtype)` took about 4 us plus a cast)."""
    S, B, N = partials.shape
    if not _use_triton(partials) or not partials.is_contiguous():
        return partials.sum(0).to(dtype)
    out = torch.empty((B, N), device=partials.device, dtype=dtype)
    block = 1024
    _sum_partials_kernel[(math.ceil(B * N / block),)](partials, out, B * N, S=S, BLOCK=block, num_warps=4,
                                                     **pdl_kwargs(pdl))
    return out


def argmax_rows(logits: torch.Tensor, pdl: bool = False, advance: tuple | None = None) -> torch.Tensor:
    """logits [B, V] -> int64 [B], the first index of each row's maximum (as `logits.argmax(-1)`). Two Triton
    launches: torch's argmax took 28 us on the H200 for one 128256-wide row (run 12's timeline).
    advance = (tokens [B], gen [B, M], step [1], pos [1]), int64: the greedy loop's bookkeeping in the same launch:
    tokens = the argmax, gen[:, min(step, M - 1)] = it, step += 1, pos += 1."""
    if not _use_triton(logits) or not logits.is_contiguous():
        nxt = logits.argmax(dim=-1)
        if advance is not None:
            tokens, gen, step, pos = advance
            gen.index_copy_(1, step.clamp(max=gen.shape[1] - 1), nxt[:, None])
            tokens.copy_(nxt)
            step.add_(1)
            pos.add_(1)
        return nxt
    B, V = logits.shape
    block = 1024
    nblk = math.ceil(V / block)
    vals = torch.empty((B, nblk), device=logits.device, dtype=torch.float32)
    idx = torch.empty((B, nblk), device=logits.device, dtype=torch.int32)
    out = torch.empty((B,), device=logits.device, dtype=torch.long)
    tokens, gen, step, pos = advance if advance is not None else (out, out, out, out)
    assert advance is None or (gen.shape[0] == B and gen.is_contiguous() and tokens.shape == (B,)
                               and all(x.dtype == torch.long for x in advance))
    kw = pdl_kwargs(pdl)
    _argmax_blocks_kernel[(B, nblk)](logits, vals, idx, V, nblk, BLOCK=block, num_warps=4, **kw)
    _argmax_final_kernel[(1,)](vals, idx, out, tokens, gen, step, pos, B, nblk, gen.shape[-1] if advance else 1,
                               BLOCK_B=max(2, _np2(B)), BLOCK=max(16, _np2(nblk)), ADVANCE=advance is not None,
                               num_warps=4, **kw)
    return out
