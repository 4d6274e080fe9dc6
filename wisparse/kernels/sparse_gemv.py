"""Sparse GEMV on column-major weights with the threshold test fused in (Triton), plus its reference.

Semantics (identical to `wisparse.sparse_linear.reference_threshold_mask` followed by `F.linear`):

    y_p[b, :] = (x[b] * (|x[b]| > t_p)) @ W_p^T        for each projection p of a group

* `wt`  [K, N]   the weights of a group of projections that share one input, stored transposed and concatenated
                 along the output dimension (q|k|v, gate|up, or one projection): row k is input channel k.
* `t`   [P, K]   fp32 per-channel thresholds, one row per projection (equal rows = a shared site mask).
* `x`   [B, K]   bf16 or fp16, B = 1..8.
* result         fp32 partial sums [S, B, N] over S slices of the input channels: `out.sum(0)` is y. Returning the
                 split-K partials (instead of reducing them with atomics or a second launch) lets the consumer (a
                 norm, RoPE, SiLU*mul or residual kernel that runs anyway) add them for free.

How the work shrinks with sparsity: program (n, s) owns output columns [n*BN, (n+1)*BN) of one projection and input
channels [s*KR, (s+1)*KR). Phase 1 tests its KR channels against the thresholds (a cheap, L2-resident read of x and
t) and compacts the surviving channel indices (union over the batch rows) into a private scratch list with a
prefix sum. Phase 2 loops only over that list, BLOCK_K surviving rows at a time, so both the bytes read and the
number of dependent loop iterations (the latency chain that keeps split-K kernels at half of dense time at high
sparsity) fall in proportion to the density. Each row of a batch is multiplied by its own masked values, so each
row's result equals its own masked GEMV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:  # Triton is optional: without it (CPU-only installs) the reference path is used.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAVE_TRITON = False


# ----------------------------------------------------------------------------------------------------------------
# reference (float semantics the kernel must reproduce)
# ----------------------------------------------------------------------------------------------------------------
def reference_sparse_gemv(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int],
                          dense: bool = False, dtype=None) -> torch.Tensor:
    """y [B, N] = per projection p: (x * (|x| > t[p])) @ wt[:, cols_p], computed in `dtype` (default fp32)."""
    dtype = dtype or torch.float32
    outs, c0 = [], 0
    for p, w in enumerate(widths):
        xm = x if dense else x * (x.abs() > t[p].to(x.dtype))
        outs.append(xm.to(dtype) @ wt[:, c0:c0 + w].to(dtype))
        c0 += w
    return torch.cat(outs, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 128      # output columns per program (a contiguous 2*block_n-byte segment of each weight row)
    kr: int = 1024          # input channels per split (programs along the K axis = ceil(K / kr))
    block_k: int = 32       # surviving rows multiplied per loop iteration
    chunk: int = 1024       # channels tested per phase-1 step (<= kr, divides kr)
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = True    # tensor-core dot (batch padded to 16); False: FMA (batch 1 only)
    compact: bool = True    # compact surviving channels first (work shrinks with sparsity); False: masked loads
    prefetch: bool = False  # compact mode: load the next chunk's indices and rows before this chunk's product
    listed: bool = False    # batch 1: read a precomputed list of surviving channels (segments of kr channels)
    split: int = 1          # listed: programs per segment along K; partials S = ceil(K / kr) * split
    skip_rows: bool = True  # masked mode: skip weight rows no batch row keeps; False: read every row (the loads
                            # then do not wait on x and the threshold test, and pipeline like dense; batch > 1)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def default_config(K: int, N: int, B: int, n_sm: int = 132, dense: bool = False) -> GemvConfig:
    """Heuristic: about 3 programs per SM, 256-byte row segments, tensor-core dot (measured: the FMA path reached
    only 2.3 TB/s dense on 14336x4096 on an H200, the dot path ~96% of cuBLAS end to end). Batch 1 sparse: listed
    mode (survivor lists compacted once per x); otherwise static addresses (batch > 1: every weight row read,
    each batch row's own mask applied to x). The benchmark's sweep measures the alternatives per shape."""
    block_n = 128
    while block_n > 16 and N < block_n * 2:
        block_n //= 2
    tiles = max(1, math.ceil(N / block_n))
    want = 3 * n_sm
    splits = max(1, min(64, math.ceil(want / tiles)))
    kr = max(128, _pow2_floor(math.ceil(K / splits)))
    kr = min(kr, 1 << (max(K, 16) - 1).bit_length())
    if B == 1 and not dense:  # listed: segments of kr channels, one program per (column tile, segment); >= 512
        kr = max(kr, min(512, 1 << (max(K, 16) - 1).bit_length()))  # so the consumer sums <= ~8-16 partials
        return GemvConfig(block_n=block_n, kr=kr, block_k=64, chunk=min(kr, 1024), num_warps=4, num_stages=5,
                          use_dot=True, compact=False, listed=True, split=1)
    # batch > 1 sparse reads every weight row (the union of the rows' masks is nearly dense, and loads that do not
    # wait on the threshold test pipeline like dense: 37.0 us against 53.8 us with row skipping at batch 8, run 9)
    return GemvConfig(block_n=block_n, kr=kr, block_k=64, chunk=min(kr, 1024), num_warps=4, num_stages=3,
                      use_dot=True, compact=False, prefetch=False, skip_rows=False)


# ----------------------------------------------------------------------------------------------------------------
# per-program timestamps, for diagnosis only (`benchmarks/timeline_h200.py --trace`)
# ----------------------------------------------------------------------------------------------------------------
# None (off), or {"buf": int64 CUDA tensor, "next": int, "log": list}: each GEMV launched while it is set records,
# per program, TRACE_FIELDS int64s: globaltimer (ns) at entry, after the PDL wait, after the list counts (= after the
# wait for dense), after the loop; the SM id; and the rows the program walks. The log gets one entry per launch.
TRACE: dict | None = None
TRACE_FIELDS = 6


def _trace_args(kind: str, grid: tuple, dummy: torch.Tensor, **info) -> dict:
    if TRACE is None:
        return {"trace_ptr": dummy, "TRACE": False}
    off = TRACE["next"]
    if off + grid[0] * grid[1] * TRACE_FIELDS > TRACE["buf"].numel():
        raise RuntimeError(f"TRACE buffer full: {TRACE['buf'].numel()} int64s, this launch needs "
                           f"{grid[0] * grid[1] * TRACE_FIELDS} more after {off}")
    TRACE["next"] = off + grid[0] * grid[1] * TRACE_FIELDS
    TRACE["log"].append({"kind": kind, "grid": grid, "offset": off, **info})
    return {"trace_ptr": TRACE["buf"][off:], "TRACE": True}


# ----------------------------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------------------------
if HAVE_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """Programmatic dependent launch (version-4 step, launched with `launch_pdl=True`): wait for the previous
        grid to finish and flush before touching memory (no races on reused buffers), then let the next grid launch
        and make its CTAs resident while this one runs. First statement of every kernel that takes PDL."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _clock(dep):
        """globaltimer (ns), read once `dep` (an int32) is available (TRACE only): the read is predicated on dep, so
        ptxas cannot schedule it before dep's load returns."""
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $1, 2147483647; @p mov.u64 $0, %globaltimer; @!p mov.u64 $0, 0; }",
            "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1)

    @triton.jit
    def _enter_traced(PDL: tl.constexpr, TRACE: tl.constexpr):
        """`_pdl_enter`, with the TRACE stamps at entry and after the wait (0, 0 when TRACE is off)."""
        t0 = 0
        t1 = 0
        if TRACE:
            t0 = _clock(tl.program_id(0))
        _pdl_enter(PDL)
        if TRACE:
            t1 = _clock(tl.program_id(0))
        return t0, t1

    @triton.jit
    def _trace_store(trace_ptr, t0, t1, t2, t3, work):
        """This program's TRACE record (see `TRACE`): 6 int64s, TRACE_FIELDS (checked by the TRACE test)."""
        base = trace_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * 6
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [work], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(base, t0)
        tl.store(base + 1, t1)
        tl.store(base + 2, t2)
        tl.store(base + 3, t3)
        tl.store(base + 4, sm.to(tl.int64))
        tl.store(base + 5, work.to(tl.int64))

    @triton.jit
    def _tile_cols(pid_n, T1, T2, W0, W1, W2, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        """Projection p of column tile pid_n, its global columns and their mask. ALIGN (a power of two dividing
        every width) is made visible to Triton's alignment analysis by `(v // ALIGN) * ALIGN` (exact here): without
        it the weight loads compile to 2-byte scalar loads that the pipeliner refuses (checked in the PTX)."""
        p = (pid_n >= T1).to(tl.int32) + (pid_n >= T2).to(tl.int32)
        tile0 = tl.where(p == 0, 0, tl.where(p == 1, T1, T2))
        col0 = tl.where(p == 0, 0, tl.where(p == 1, W0, W0 + W1)) // ALIGN * ALIGN
        width = tl.where(p == 0, W0, tl.where(p == 1, W1, W2)) // ALIGN * ALIGN
        lcols = (pid_n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return p, col0 + lcols, lcols < width

    @triton.jit
    def _tile_product(x_ptr, stride_xb, rows_b, bmask, tp, w_ptr, k, valid, cols, cmask, N, acc,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DENSE: tl.constexpr,
                      TEST: tl.constexpr, SKIP_ROWS: tl.constexpr = True):
        """acc += (masked x[:, k]) @ W^T[k, cols]; rows of k that are not `valid` are not read.
        TEST: apply the per-row threshold test here (masked mode / batch rows); else x at k is known to survive.
        SKIP_ROWS (with TEST): rows that no batch row keeps are not read either."""
        xb = tl.load(x_ptr + rows_b[:, None] * stride_xb + k[None, :], mask=bmask[:, None] & valid[None, :],
                     other=0.0)
        if TEST and not DENSE:
            tk = tl.load(tp + k, mask=valid, other=float("inf"))
            keep = tl.abs(xb.to(tl.float32)) > tk[None, :]
            xb = tl.where(keep, xb, 0.0)
            if SKIP_ROWS:
                rowv = valid & (tl.max(keep.to(tl.int32), axis=0) > 0)
            else:
                rowv = valid
        else:
            rowv = valid
        w = tl.load(w_ptr + k.to(tl.int64)[:, None] * N + cols[None, :], mask=rowv[:, None] & cmask[None, :],
                    other=0.0)
        if USE_DOT:
            acc += tl.dot(xb.to(w.dtype), w)
        else:  # BLOCK_B == 1: [1, BK] -> [BK, 1] broadcast against [BK, BN], reduced over k at the end
            acc += tl.reshape(xb.to(tl.float32), (BLOCK_K, 1)) * w.to(tl.float32)
        return acc

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr, w_ptr, t_ptr, out_ptr, scratch_ptr,
        B, K, N, stride_xb,
        W0, W1, W2,            # widths of the (up to 3) projections in the group; unused ones are 0
        T1, T2,                # first tile index of projection 1 and of projection 2
        N_TILES,
        ALIGN: tl.constexpr,
        KR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK_B: tl.constexpr, DENSE: tl.constexpr, USE_DOT: tl.constexpr, COMPACT: tl.constexpr,
        PREFETCH: tl.constexpr, PDL: tl.constexpr = False, SKIP_ROWS: tl.constexpr = True,
        trace_ptr=None, TRACE: tl.constexpr = False,
    ):
        t0, t1 = _enter_traced(PDL, TRACE)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        # which projection this column tile belongs to, and its columns
        p, cols, cmask = _tile_cols(pid_n, T1, T2, W0, W1, W2, BLOCK_N, ALIGN)
        tp = t_ptr + p * K
        k_lo = pid_s * KR
        k_hi = tl.minimum(k_lo + KR, K)
        rows_b = tl.arange(0, BLOCK_B)
        bmask = rows_b < B
        jj = tl.arange(0, BLOCK_K)
        if USE_DOT:
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)

        if DENSE or not COMPACT:
            # static addresses (Triton pipelines the loads); masked mode tests each chunk and skips dropped rows
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k = k0 + jj
                acc = _tile_product(x_ptr, stride_xb, rows_b, bmask, tp, w_ptr, k, k < k_hi, cols, cmask, N, acc,
                                    BLOCK_B, BLOCK_K, USE_DOT, DENSE, True, SKIP_ROWS)
        else:
            # phase 1: compact this program's surviving channels (union over batch rows) into its scratch list
            sbase = scratch_ptr + (pid_s * N_TILES + pid_n).to(tl.int64) * KR
            cnt = 0
            for c in tl.static_range(0, KR, CHUNK):
                offs = k_lo + c + tl.arange(0, CHUNK)
                inb = offs < k_hi
                tv = tl.load(tp + offs, mask=inb, other=float("inf"))
                xc = tl.load(x_ptr + rows_b[:, None] * stride_xb + offs[None, :],
                             mask=bmask[:, None] & inb[None, :], other=0.0)
                m = tl.max((tl.abs(xc.to(tl.float32)) > tv[None, :]).to(tl.int32), axis=0)
                pos = cnt + tl.cumsum(m, axis=0) - 1
                tl.store(sbase + pos, offs, mask=m > 0)
                cnt += tl.sum(m, axis=0)
            tl.debug_barrier()
            # phase 2: multiply the surviving rows only; the loop runs ceil(survivors / BLOCK_K) times
            if PREFETCH:
                # software pipelining by hand: the next chunk's indices and weight rows are loaded before this
                # chunk's product, so the dependent index -> weight loads overlap with work
                valid = jj < cnt
                k = tl.load(sbase + jj, mask=valid, other=0)
                xb = tl.load(x_ptr + rows_b[:, None] * stride_xb + k[None, :], mask=bmask[:, None] & valid[None, :],
                             other=0.0)
                w = tl.load(w_ptr + k.to(tl.int64)[:, None] * N + cols[None, :], mask=valid[:, None] & cmask[None, :],
                            other=0.0)
                for i in range(BLOCK_K, cnt + BLOCK_K, BLOCK_K):
                    jn = i + jj
                    vn = jn < cnt
                    kn = tl.load(sbase + jn, mask=vn, other=0)
                    xn = tl.load(x_ptr + rows_b[:, None] * stride_xb + kn[None, :],
                                 mask=bmask[:, None] & vn[None, :], other=0.0)
                    wn = tl.load(w_ptr + kn.to(tl.int64)[:, None] * N + cols[None, :],
                                 mask=vn[:, None] & cmask[None, :], other=0.0)
                    xm = xb
                    if BLOCK_B > 1:
                        tk = tl.load(tp + k, mask=valid, other=float("inf"))
                        xm = tl.where(tl.abs(xb.to(tl.float32)) > tk[None, :], xb, 0.0)
                    if USE_DOT:
                        acc += tl.dot(xm.to(w.dtype), w)
                    else:
                        acc += tl.reshape(xm.to(tl.float32), (BLOCK_K, 1)) * w.to(tl.float32)
                    k = kn
                    xb = xn
                    w = wn
                    valid = vn
            else:
                for i in range(0, cnt, BLOCK_K):
                    j = i + jj
                    valid = j < cnt
                    k = tl.load(sbase + j, mask=valid, other=0)
                    acc = _tile_product(x_ptr, stride_xb, rows_b, bmask, tp, w_ptr, k, valid, cols, cmask, N, acc,
                                        BLOCK_B, BLOCK_K, USE_DOT, DENSE, BLOCK_B > 1)

        if TRACE:
            t3 = _clock(tl.sum(acc).to(tl.int32))
            _trace_store(trace_ptr, t0, t1, t1, t3, k_hi - k_lo)
        obase = out_ptr + pid_s.to(tl.int64) * B * N
        if USE_DOT:
            tl.store(obase + rows_b[:, None] * N + cols[None, :], acc, mask=bmask[:, None] & cmask[None, :])
        else:
            tl.store(obase + cols, tl.sum(acc, axis=0), mask=cmask)


    # ------------------------------------------------------------------------------------------------------------
    # listed mode (batch 1): the surviving channels are compacted once per input vector, by the kernel that
    # produces x (add_rmsnorm, silu_mul: see decode_ops) or by `_compact_kernel`; the GEMV then only walks the list
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def _store_list(y, keep, offs, seg, seg_ok, lbase, cbase, idx_ptr, xv_ptr, cnt_ptr, SEG: tl.constexpr):
        """y, keep, offs [NS, SEG]: values, survival and channel index of NS segments (seg [NS] their numbers).
        Writes each segment's survivors in channel order to idx/xv[lbase + seg*SEG + j] and counts to cnt[cbase+seg]."""
        k32 = keep.to(tl.int32)
        pos = tl.cumsum(k32, axis=1) - 1
        dst = lbase + seg[:, None] * SEG + pos
        tl.store(idx_ptr + dst, offs, mask=keep)
        tl.store(xv_ptr + dst, y.to(tl.float32), mask=keep)
        tl.store(cnt_ptr + cbase + seg, tl.sum(k32, axis=1), mask=seg_ok)

    @triton.jit
    def _compact_kernel(x_ptr, t_ptr, idx_ptr, xv_ptr, cnt_ptr, K, NSEG, SEG: tl.constexpr,
                        PDL: tl.constexpr = False):
        """Program (p, s): segment s of x [1, K] against thresholds t[p] -> list p, segment s."""
        _pdl_enter(PDL)
        p = tl.program_id(0)
        s = tl.program_id(1)
        seg = s + tl.arange(0, 1)
        offs = seg[:, None] * SEG + tl.arange(0, SEG)[None, :]
        inb = offs < K
        x = tl.load(x_ptr + offs, mask=inb, other=0.0)
        t = tl.load(t_ptr + p * K + offs, mask=inb, other=float("inf"))
        keep = tl.abs(x.to(tl.float32)) > t
        _store_list(x, keep, offs, seg, seg < NSEG, p * K, p * NSEG, idx_ptr, xv_ptr, cnt_ptr, SEG)

    @triton.jit
    def _list_part(c, part, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
        """[lo, hi) of a segment's c survivors that part `part` of SPLIT walks (whole BLOCK_K chunks each)."""
        share = tl.cdiv(tl.cdiv(c, SPLIT), BLOCK_K) * BLOCK_K
        lo = part * share
        return lo, tl.minimum(lo + share, c)

    @triton.jit
    def _sub_counts(cnt_ptr, base, left, SUB: tl.constexpr, R: tl.constexpr):
        """A list segment written as R <= 4 sub-lists of SUB channels (counts at cnt_ptr + base + r, r < left
        valid): its survivor count, and the inclusive count prefixes i0..i2 and unused tails g0..g2 = SUB - count of
        the first three sub-lists, as scalars (`_list_walk` maps a position of the concatenated list to its slot
        with them; a [positions, R] tensor there cost a layout conversion per chunk: the GEMVs were 1-4 us slower
        in run 12)."""
        c0 = tl.load(cnt_ptr + base)
        c1 = tl.load(cnt_ptr + base + 1, mask=left > 1, other=0)
        c2 = tl.load(cnt_ptr + base + 2, mask=(left > 2) & (R > 2), other=0)
        c3 = tl.load(cnt_ptr + base + 3, mask=(left > 3) & (R > 3), other=0)
        return c0 + c1 + c2 + c3, c0, c0 + c1, c0 + c1 + c2, SUB - c0, SUB - c1, SUB - c2

    @triton.jit
    def _list_walk(idx_ptr, xv_ptr, lbase, lo, hi, w_ptr, N, cols, cmask, i0, i1, i2, g0, g1, g2,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
        """Sum over list entries [lo, hi) at lbase of xv * W[idx, cols], as row 0 of a [16, BLOCK_N] fp32 tile (the
        tensor-core dot's minimum height; the other rows are zeros). The index, value and weight-row loads do not
        depend on earlier iterations, so Triton pipelines them num_stages deep.
        R > 1 (2 or 4): the list is R sub-lists (see `_sub_counts`): position j sits at slot j + the unused tails of
        the sub-lists before it (those whose inclusive prefix is <= j)."""
        jj = tl.arange(0, BLOCK_K)
        first = (tl.arange(0, 16) == 0)[:, None]
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for i in range(lo, hi, BLOCK_K):
            j = i + jj
            valid = j < hi
            slot = j
            if R > 1:
                slot += tl.where(j >= i0, g0, 0)
            if R > 2:
                slot += tl.where(j >= i1, g1, 0) + tl.where(j >= i2, g2, 0)
            k = tl.load(idx_ptr + lbase + slot, mask=valid, other=0)
            xv = tl.load(xv_ptr + lbase + slot, mask=valid, other=0.0)
            w = tl.load(w_ptr + k[:, None] * N + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
            acc += tl.dot(tl.where(first, xv[None, :], 0.0).to(w.dtype), w)
        return acc

    @triton.jit
    def _store_row0(row_ptr, cols, cmask, acc):
        """Store row 0 of a `_list_walk` tile (the only non-zero row) at row_ptr[cols]."""
        first = (tl.arange(0, 16) == 0)[:, None]
        tl.store(row_ptr + cols[None, :] + tl.arange(0, 16)[:, None] * 0, acc, mask=first & cmask[None, :])

    @triton.jit
    def _gemv_list_kernel(
        idx_ptr, xv_ptr, cnt_ptr, w_ptr, out_ptr,
        K, N, NSUB, W0, W1, W2, T1, T2,
        SEG: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr,
        R: tl.constexpr = 1, PDL: tl.constexpr = False, trace_ptr=None, TRACE: tl.constexpr = False,
    ):
        """Program (n, s): columns of tile n, part s % SPLIT of list segment s // SPLIT (SEG channels, written as R
        in (1, 2, 4) sub-lists of SEG / R channels; NSUB sub-lists per projection). Its loop runs
        ceil(survivors / SPLIT / BLOCK_K) times: work and latency chain shrink with sparsity."""
        t0, t1 = _enter_traced(PDL, TRACE)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        p, cols, cmask = _tile_cols(pid_n, T1, T2, W0, W1, W2, BLOCK_N, ALIGN)
        seg = pid_s // SPLIT
        if R > 1:
            c, i0, i1, i2, g0, g1, g2 = _sub_counts(cnt_ptr, p * NSUB + seg * R, NSUB - seg * R, SEG // R, R)
        else:
            c = tl.load(cnt_ptr + p * NSUB + seg)
            i0, i1, i2, g0, g1, g2 = 0, 0, 0, 0, 0, 0
        lo, hi = _list_part(c, pid_s % SPLIT, SPLIT, BLOCK_K)
        if TRACE:
            t2 = _clock(hi)
        acc = _list_walk(idx_ptr, xv_ptr, p * K + seg * SEG, lo, hi, w_ptr, N, cols, cmask, i0, i1, i2, g0, g1, g2,
                         BLOCK_N, BLOCK_K, R)
        if TRACE:
            _trace_store(trace_ptr, t0, t1, t2, _clock(tl.sum(acc).to(tl.int32)), hi - lo)
        _store_row0(out_ptr + pid_s * N, cols, cmask, acc)


def _align(widths: list[int]) -> int:
    """Largest power of two <= 8 dividing every width (so every column offset): 8 bf16 = 16-byte vector loads."""
    return math.gcd(8, *widths) if len(widths) > 0 else 1


def _tiles(widths: list[int], block_n: int) -> list[int]:
    return [math.ceil(w / block_n) if w > 0 else 0 for w in widths]


def launch_sparse_gemv(x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, widths: list[int],
                       dense: bool = False, config: GemvConfig | None = None, runner=None,
                       out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """Run the Triton kernel; returns fp32 partials [S, B, N]. `runner` wraps the kernel (e.g. `wrap_triton`);
    `pdl`: programmatic dependent launch (the version-4 decode step)."""
    assert HAVE_TRITON, "triton is not installed"
    B, K = x.shape
    N = wt.shape[1]
    assert wt.shape[0] == K and wt.stride(1) == 1 and wt.stride(0) == N, "wt must be a contiguous [K, N]"
    assert x.stride(1) == 1 and 1 <= B <= 16 and 1 <= len(widths) <= 3 and sum(widths) == N
    cfg = config or default_config(K, N, B, dense=dense)
    if is_listed(cfg, B, dense):  # compact once (one small launch), then walk the list
        idx, xv, cnt = launch_compact(x, t, cfg.kr, runner=runner, pdl=pdl)
        return launch_gemv_list(idx, xv, cnt, wt, widths, cfg, out=out, runner=runner, pdl=pdl)
    use_dot = cfg.use_dot or B > 1
    block_b = 16 if use_dot else 1
    w = list(widths) + [0] * (3 - len(widths))
    tiles = _tiles(w, cfg.block_n)
    n_tiles = sum(tiles)
    kr = cfg.kr
    chunk = min(cfg.chunk, kr)
    splits = math.ceil(K / kr)
    if out is None:
        out = torch.empty((splits, B, N), device=x.device, dtype=torch.float32)
    assert out.shape == (splits, B, N) and out.dtype == torch.float32 and out.is_contiguous()
    scratch = torch.empty((splits * n_tiles * kr,) if (cfg.compact and not dense) else (1,), device=x.device,
                          dtype=torch.int32)
    kernel = _sparse_gemv_kernel if runner is None else runner(_sparse_gemv_kernel)
    _launch_capped(
        kernel, (n_tiles, splits), ("gemv", K, N, B, dense, cfg, tuple(widths), x.dtype), x.device, pdl,
        x, wt, t, out, scratch, B, K, N, x.stride(0), w[0], w[1], w[2],
        tiles[0], tiles[0] + tiles[1], n_tiles, ALIGN=_align(widths),
        KR=kr, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, CHUNK=chunk, BLOCK_B=block_b,
        DENSE=dense, USE_DOT=use_dot, COMPACT=cfg.compact, PREFETCH=cfg.prefetch, SKIP_ROWS=cfg.skip_rows,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(pdl),
        **_trace_args("dense" if dense else "masked", (n_tiles, splits), out, K=K, N=N, B=B, BN=cfg.block_n))
    return out


# Under PDL (the decode step) a GEMV's resident CTAs per SM are capped at ceil(grid / SMs), by padding its dynamic
# shared memory. Why: the GEMV is placed while the kernel that launched it still holds some SMs (its programs are
# past their own PDL trigger), and a grid that fits on the other SMs never reaches those (trace, run 28: q/k/v's 384
# programs on 108 SMs, 24 SMs idle for the whole GEMV). With the cap, the programs that do not fit wait and go to
# those SMs as soon as they are free, while the others are still resident early (a later trigger loses that,
# run 34). Measured in the decode step (run 39): q/k/v and o on 128-129 SMs, -1.0 and -0.7 us per layer; where the
# grid already spreads (gate/up, down, the lm_head) the cap changes nothing.
CAP_CTAS = True
_SM_INFO: dict[int, tuple[int, int]] = {}  # device index -> (SMs, shared memory per SM in bytes)
_LAUNCHED: dict[tuple, object] = {}  # launch key -> its compiled kernel (from the first launch)
_CTA_RESERVED_SMEM = 1024  # shared memory the hardware reserves per CTA (sm_80+)


def padded_smem(ctas: int, own: int, smem_per_sm: int, reserved: int = _CTA_RESERVED_SMEM) -> int:
    """Dynamic shared memory per CTA that lets `ctas` CTAs share an SM but not ctas + 1 (never below `own`, the
    kernel's own need); each CTA also takes `reserved` bytes."""
    between = (smem_per_sm // ctas + smem_per_sm // (ctas + 1)) // 2 - reserved
    return max(own, between)


def _cu_set_attr(function: int, attr: int, value: int) -> None:
    import ctypes

    rc = ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(ctypes.c_void_p(function), attr, value)
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute({attr}, {value}) failed with CUDA error {rc}")


def set_ctas_per_sm(ck, ctas: int, smem_per_sm: int, set_attr=None) -> None:
    """Launch the compiled kernel `ck` (its next launches) with at most `ctas` CTAs per SM (0: as compiled).
    set_attr(function, attribute, value): cuFuncSetAttribute (replaceable for tests)."""
    set_attr = set_attr or _cu_set_attr
    orig = getattr(ck, "_wisparse_packed", None)
    if orig is None:
        orig = ck._wisparse_packed = tuple(ck.packed_metadata)
    if not ctas:
        ck.packed_metadata = orig
        return
    shared = padded_smem(ctas, orig[2], smem_per_sm)
    if shared != orig[2] and getattr(ck, "_wisparse_max_shared", 0) < shared:
        set_attr(ck.function, 8, shared)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        set_attr(ck.function, 9, 100)  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: all shared memory
        ck._wisparse_max_shared = shared
    ck.packed_metadata = (orig[0], orig[1], shared)


def _ctas_cap(device: torch.device, grid: tuple, pdl: bool) -> tuple[int, int]:
    """(CTAs per SM, shared memory per SM) for a launch: the cap under PDL, else (0, 0)."""
    if not (pdl and CAP_CTAS and device.type == "cuda"):
        return 0, 0
    sms, smem = _sm_info(device)
    return math.ceil(math.prod(grid) / sms), smem


def _sm_info(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory per SM in bytes: the per-block opt-in maximum + the reserve of one block)."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_INFO:
        props = triton.runtime.driver.active.utils.get_device_properties(i)
        _SM_INFO[i] = (props["multiprocessor_count"], props["max_shared_mem"] + _CTA_RESERVED_SMEM)
    return _SM_INFO[i]


def _launch_capped(kernel, grid: tuple, key: tuple, device: torch.device, pdl: bool, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), with the CTA cap (`CAP_CTAS`) set on its compiled kernel before the launch:
    the same compiled kernel may serve launches with different grids, and a graph capture records each launch's
    shared memory size as it is at that launch."""
    ctas, smem = _ctas_cap(device, grid, pdl)
    key = (*key, pdl, TRACE is not None, device)  # what else selects the compiled kernel
    ck = _LAUNCHED.get(key)
    if ck is not None:
        set_ctas_per_sm(ck, ctas, smem)
    launched = kernel[grid](*args, **kwargs)
    if launched is not ck and hasattr(launched, "packed_metadata"):  # first launch of this key (as compiled)
        _LAUNCHED[key] = launched
        set_ctas_per_sm(launched, ctas, smem)  # capped from its next launch on


def pdl_kwargs(pdl: bool) -> dict:
    """Launch arguments for programmatic dependent launch: the kernel's PDL constexpr and Triton's launch flag.
    PDL=False is passed explicitly too: Inductor's `wrap_triton` tracing (torch.compile of the custom op) needs every
    kernel argument, defaults included (a missing one failed the compile test on the H200, run 3)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def is_listed(cfg: GemvConfig, B: int, dense: bool) -> bool:
    return cfg.listed and B == 1 and not dense


def num_splits(K: int, N: int, B: int, config: GemvConfig | None = None, dense: bool = False) -> int:
    """S of the [S, B, N] partials a launch with this configuration returns."""
    cfg = config or default_config(K, N, B, dense=dense)
    return math.ceil(K / cfg.kr) * (cfg.split if is_listed(cfg, B, dense) else 1)


def list_buffers(P: int, K: int, seg: int, device) -> tuple[torch.Tensor, ...]:
    """Survivor lists of one input vector for P projections: idx [P, K] int32, xv [P, K] fp32 (the values, exact;
    4-byte elements so Triton pipelines their loads), counts cnt [P, NSEG] int32; segment s of projection p holds
    its survivors in channel order at [p, s*seg : s*seg + cnt[p, s]]."""
    nseg = math.ceil(K / seg)
    return (torch.empty((P, K), device=device, dtype=torch.int32),
            torch.empty((P, K), device=device, dtype=torch.float32),
            torch.empty((P, nseg), device=device, dtype=torch.int32))


def reference_compact(x: torch.Tensor, t: torch.Tensor, seg: int,
                      bufs: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """The lists `_compact_kernel` writes, in PyTorch (x [1, K]; survival |x| > t in fp32); unused slots zero."""
    P, K = t.shape
    idx, xv, cnt = bufs or list_buffers(P, K, seg, x.device)
    idx.zero_()
    xv.zero_()
    keep = x.reshape(1, K).float().abs() > t.float()
    for p in range(P):
        for s in range(cnt.shape[1]):
            k0 = s * seg
            ks = k0 + torch.nonzero(keep[p, k0:k0 + seg]).flatten()
            idx[p, k0:k0 + len(ks)] = ks.to(torch.int32)
            xv[p, k0:k0 + len(ks)] = x.reshape(K)[ks].float()
            cnt[p, s] = len(ks)
    return idx, xv, cnt


def reference_gemv_list(idx: torch.Tensor, xv: torch.Tensor, cnt: torch.Tensor, wt: torch.Tensor,
                        widths: list[int], cfg: GemvConfig, sub: int | None = None) -> torch.Tensor:
    """What `_gemv_list_kernel` computes, in PyTorch: fp32 partials [NSEG * split, 1, N]. The lists hold sub-lists
    of `sub` channels (default cfg.kr); a segment of cfg.kr channels walks its sub-lists one after another."""
    K, N = wt.shape
    sub = sub or cfg.kr
    nseg, split, r = math.ceil(K / cfg.kr), cfg.split, cfg.kr // sub
    out = torch.zeros((nseg * split, 1, N), device=wt.device, dtype=torch.float32)
    c0 = 0
    for p, w in enumerate(widths):
        for s in range(nseg):
            blocks = range(s * r, min((s + 1) * r, cnt.shape[1]))
            ks = torch.cat([idx[p, b * sub: b * sub + int(cnt[p, b])] for b in blocks]).long()
            vs = torch.cat([xv[p, b * sub: b * sub + int(cnt[p, b])] for b in blocks]).float()
            c = len(ks)
            share = math.ceil(math.ceil(c / split) / cfg.block_k) * cfg.block_k  # as the kernel: whole chunks
            for part in range(split):
                lo, hi = part * share, min((part + 1) * share, c)
                if hi <= lo:
                    continue
                out[s * split + part, 0, c0:c0 + w] = vs[lo:hi] @ wt[ks[lo:hi], c0:c0 + w].float()
        c0 += w
    return out


def launch_compact(x: torch.Tensor, t: torch.Tensor, seg: int, bufs: tuple[torch.Tensor, ...] | None = None,
                   runner=None, pdl: bool = False) -> tuple[torch.Tensor, ...]:
    """x [1, K] against t [P, K] -> (idx, xv, cnt) lists (see `list_buffers`); one program per (p, segment)."""
    P, K = t.shape
    assert x.shape == (1, K) and x.is_contiguous() and t.is_contiguous() and seg & (seg - 1) == 0
    idx, xv, cnt = bufs or list_buffers(P, K, seg, x.device)
    kernel = _compact_kernel if runner is None else runner(_compact_kernel)
    kernel[(P, cnt.shape[1])](x, t, idx, xv, cnt, K, cnt.shape[1], SEG=seg, num_warps=4 if seg <= 1024 else 8,
                              **pdl_kwargs(pdl))
    return idx, xv, cnt


def launch_gemv_list(idx: torch.Tensor, xv: torch.Tensor, cnt: torch.Tensor, wt: torch.Tensor,
                     widths: list[int], cfg: GemvConfig, out: torch.Tensor | None = None, runner=None,
                     pdl: bool = False, sub: int | None = None) -> torch.Tensor:
    """Batch-1 sparse GEMV over survivor lists: fp32 partials [NSEG*split, 1, N] for segments of cfg.kr channels.
    The lists may be written as sub-lists of `sub` channels (cfg.kr, cfg.kr / 2 or cfg.kr / 4; default cfg.kr):
    their producers then run more, smaller programs, and each GEMV program walks its segment's sub-lists as one
    list."""
    K, N = wt.shape
    sub = sub or cfg.kr
    assert wt.stride(1) == 1 and wt.stride(0) == N and 1 <= len(widths) <= 3 and sum(widths) == N
    assert sub * 4 in (cfg.kr, 2 * cfg.kr, 4 * cfg.kr), f"sub-list size {sub}: cfg.kr ({cfg.kr}) / 1, 2 or 4"
    assert K * N < 2 ** 31 and idx.shape == (len(widths), K) and cnt.shape == (len(widths), math.ceil(K / sub))
    w = list(widths) + [0] * (3 - len(widths))
    tiles = _tiles(w, cfg.block_n)
    S = math.ceil(K / cfg.kr) * cfg.split
    if out is None:
        out = torch.empty((S, 1, N), device=wt.device, dtype=torch.float32)
    assert out.shape == (S, 1, N) and out.dtype == torch.float32 and out.is_contiguous()
    kernel = _gemv_list_kernel if runner is None else runner(_gemv_list_kernel)
    _launch_capped(
        kernel, (sum(tiles), S), ("list", K, N, cfg, sub, tuple(widths), wt.dtype), wt.device, pdl,
        idx, xv, cnt, wt, out, K, N, cnt.shape[1], w[0], w[1], w[2], tiles[0], tiles[0] + tiles[1],
        SEG=cfg.kr, SPLIT=cfg.split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ALIGN=_align(widths),
        R=cfg.kr // sub, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(pdl),
        **_trace_args("list", (sum(tiles), S), out, K=K, N=N, B=1, BN=cfg.block_n))
    return out
