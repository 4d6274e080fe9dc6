"""Batch-1 sparse MLP in one persistent launch: gate|up list GEMV -> SiLU*mul (+ down's survivor lists) -> down
list GEMV, with the stages handed over by arrival counters instead of kernel boundaries (version 5 of the step).

Why it was tried: at 50% sparsity a Llama-3.1-8B layer spends ~18 us of its ~90 us in the fixed cost of its GEMV
launches (~4.5 us each, run 6), and the same fixed cost in dense is what caps the ratio near 1.5x
(`benchmarks/NOTES_gpu.md`). Here the three MLP launches become one: the down GEMV's first column tiles start while
the last gate|up tiles are in flight. Measured (runs 7-8, H200): bitwise equal, but slower than the three launches
with PDL (52.4 us at 50%): 67.0 us with a persistent grid, whose programs run their items' dependent load chains
one after another where separate launches run ~900 such chains at once, and 63.2 us with one program per item,
where the hand-over (arrival atomics, one program doing a chunk's SiLU*mul, down programs spinning) costs more than
the kernel boundaries it replaces. Opt-in (`Decoder.persistent_mlp`).

Work items, handed out in order by an atomic ticket counter (one program per item by default; `occupancy` > 0: a
persistent grid of that many programs per SM loops over them):
* gate|up items (column tile j of gate or up, list part sp): ordered by tile, so the h channels of chunk 0
  (`hc` channels = down's list segment) are finished first. Each stores its fp32 partial tile, then counts itself
  in the chunk's arrival counter; the program that completes a chunk sums the chunk's partials, applies
  SiLU*mul with the rounding of `decode_ops.silu_mul`, writes h and down's survivor list for the chunk, and sets
  the chunk's ready flag.
* down items (column tile n of the down projection, chunk c, part): wait for chunk c's flag, then walk its list.
Deadlock-free with any grid size: tickets are taken in order, an item only waits on items with smaller tickets,
and those are held by running programs that never wait (gate|up items). The last program to finish resets the
counters, so a CUDA graph replays it as is.

The arithmetic is that of the unfused step with the same configurations (same list walks, same partial layout,
same summation order in SiLU*mul): results are bitwise equal to `gemv_list` + `silu_mul` + `gemv_list`.
"""
from __future__ import annotations

import math

import torch

from .sparse_gemv import HAVE_TRITON, GemvConfig, _align, pdl_kwargs

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .sparse_gemv import _list_part, _list_walk, _pdl_enter, _store_row0

    @triton.jit
    def _silu_chunk(pg_ptr, h_ptr, t_ptr, idx_ptr, xv_ptr, cnt_ptr, c, I, S: tl.constexpr, HC: tl.constexpr,
                    SB: tl.constexpr):
        """h = round(silu(round(gate))) * round(up) on chunk c's channels (gate|up partials [S, 2I] summed in order
        s = 0..S-1, as `silu_mul`), stored, and the survivors (|h| > t) listed in channel order at [c*HC, ...)."""
        dt = h_ptr.dtype.element_ty
        run = 0
        for s0 in range(0, HC, SB):
            offs = c * HC + s0 + tl.arange(0, SB)
            m = offs < I
            g = tl.zeros((SB,), dtype=tl.float32)
            u = tl.zeros((SB,), dtype=tl.float32)
            for s in tl.static_range(S):
                g += tl.load(pg_ptr + s * 2 * I + offs, mask=m, other=0.0)
                u += tl.load(pg_ptr + s * 2 * I + I + offs, mask=m, other=0.0)
            g = g.to(dt).to(tl.float32)
            u = u.to(dt).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            y = (a * u).to(dt)
            tl.store(h_ptr + offs, y, mask=m)
            keep = (tl.abs(y.to(tl.float32)) > tl.load(t_ptr + offs, mask=m, other=float("inf"))).to(tl.int32)
            pos = c * HC + run + tl.cumsum(keep, axis=0) - 1
            tl.store(idx_ptr + pos, offs, mask=keep > 0)
            tl.store(xv_ptr + pos, y.to(tl.float32), mask=keep > 0)
            run += tl.sum(keep, axis=0)
        tl.store(cnt_ptr + c, run)

    @triton.jit
    def _mlp_item(u, gidx_ptr, gxv_ptr, gcnt_ptr, wgu_ptr, pg_ptr, td_ptr, h_ptr, didx_ptr, dxv_ptr, dcnt_ptr, wd_ptr,
                  out_ptr, arrive_ptr, ready_ptr, D, I, T_GU, T_D, U,
                  NSEG_GU: tl.constexpr, SEG_GU: tl.constexpr, SPLIT_GU: tl.constexpr, BN_GU: tl.constexpr,
                  BK_GU: tl.constexpr, HC: tl.constexpr, SPLIT_D: tl.constexpr, BN_D: tl.constexpr,
                  BK_D: tl.constexpr, SB: tl.constexpr, ALIGN_GU: tl.constexpr):
        """Work item u: a gate|up item (u < U; the chunk's last one also does SiLU*mul and down's list) or a down
        item (waits for its chunk's ready flag)."""
        NS: tl.constexpr = NSEG_GU * SPLIT_GU   # gate|up partial rows
        TPC: tl.constexpr = HC // BN_GU         # gate (or up) column tiles per h chunk
        if u < U:
            j = u // (2 * NS)
            r = u % (2 * NS)
            p = r // NS
            sp = r % NS
            lcols = j * BN_GU + tl.arange(0, BN_GU)
            cmask = lcols < I
            cols = (p * I) // ALIGN_GU * ALIGN_GU + lcols
            seg = sp // SPLIT_GU
            lo, hi = _list_part(tl.load(gcnt_ptr + p * NSEG_GU + seg), sp % SPLIT_GU, SPLIT_GU, BK_GU)
            acc = _list_walk(gidx_ptr, gxv_ptr, p * D + seg * SEG_GU, lo, hi, wgu_ptr, 2 * I, cols, cmask, 0, 0, 0, 0,
                             0, 0, BN_GU, BK_GU, 1)
            _store_row0(pg_ptr + sp * 2 * I, cols, cmask, acc)
            tl.debug_barrier()  # every thread's partial stores precede the release below
            c = j // TPC
            need = tl.minimum(TPC, T_GU - c * TPC) * 2 * NS
            if tl.atomic_add(arrive_ptr + c, 1, sem="acq_rel") == need - 1:
                _silu_chunk(pg_ptr, h_ptr, td_ptr, didx_ptr, dxv_ptr, dcnt_ptr, c, I, NS, HC, SB)
                tl.debug_barrier()
                tl.atomic_xchg(ready_ptr + c, 1, sem="release")
        else:
            v = u - U
            n = v % T_D
            cp = v // T_D                       # chunk * SPLIT_D + part: the partial row
            c = cp // SPLIT_D
            while tl.atomic_add(ready_ptr + c, 0, sem="acquire") == 0:
                pass
            cols = n * BN_D + tl.arange(0, BN_D)
            cmask = cols < D
            lo, hi = _list_part(tl.load(dcnt_ptr + c), cp % SPLIT_D, SPLIT_D, BK_D)
            acc = _list_walk(didx_ptr, dxv_ptr, c * HC, lo, hi, wd_ptr, D, cols, cmask, 0, 0, 0, 0, 0, 0, BN_D,
                             BK_D, 1)
            _store_row0(out_ptr + cp * D, cols, cmask, acc)

    @triton.jit
    def _fused_mlp_kernel(
        gidx_ptr, gxv_ptr, gcnt_ptr, wgu_ptr, pg_ptr,        # gate|up: input lists [2, D], weights [D, 2I], partials
        td_ptr, h_ptr, didx_ptr, dxv_ptr, dcnt_ptr,          # down: thresholds [I], h [I], lists [I], counts [NCH]
        wd_ptr, out_ptr, ctr_ptr,                            # down weights [I, D], partials [NCH*SPLIT_D, D]; counters
        D, I, NCH, T_GU, T_D,
        NSEG_GU: tl.constexpr, SEG_GU: tl.constexpr, SPLIT_GU: tl.constexpr, BN_GU: tl.constexpr,
        BK_GU: tl.constexpr, HC: tl.constexpr, SPLIT_D: tl.constexpr, BN_D: tl.constexpr, BK_D: tl.constexpr,
        SB: tl.constexpr, ALIGN_GU: tl.constexpr, PERSIST: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        """PERSIST: a grid of a few programs per SM loops over the items; else one program per item (the grid is
        the item count), each taking its item by ticket, so items still start in ticket order."""
        _pdl_enter(PDL)
        U = T_GU * 2 * NSEG_GU * SPLIT_GU       # gate|up items
        V = NCH * SPLIT_D * T_D                 # down items
        arrive_ptr = ctr_ptr + 2
        ready_ptr = ctr_ptr + 2 + NCH
        u = tl.atomic_add(ctr_ptr, 1, sem="relaxed")
        if PERSIST:
            while u < U + V:
                nxt = tl.atomic_add(ctr_ptr, 1, sem="relaxed")  # taken early: its latency overlaps this item
                _mlp_item(u, gidx_ptr, gxv_ptr, gcnt_ptr, wgu_ptr, pg_ptr, td_ptr, h_ptr, didx_ptr, dxv_ptr,
                          dcnt_ptr, wd_ptr, out_ptr, arrive_ptr, ready_ptr, D, I, T_GU, T_D, U, NSEG_GU, SEG_GU,
                          SPLIT_GU, BN_GU, BK_GU, HC, SPLIT_D, BN_D, BK_D, SB, ALIGN_GU)
                u = nxt
        else:
            _mlp_item(u, gidx_ptr, gxv_ptr, gcnt_ptr, wgu_ptr, pg_ptr, td_ptr, h_ptr, didx_ptr, dxv_ptr,
                      dcnt_ptr, wd_ptr, out_ptr, arrive_ptr, ready_ptr, D, I, T_GU, T_D, U, NSEG_GU, SEG_GU,
                      SPLIT_GU, BN_GU, BK_GU, HC, SPLIT_D, BN_D, BK_D, SB, ALIGN_GU)
        # the last program out resets the counters for the next launch (graph replay, next layer)
        tl.debug_barrier()
        if tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            tl.store(ctr_ptr + tl.arange(0, 2), tl.zeros((2,), dtype=tl.int32))
            for c0 in range(0, 2 * NCH, 64):
                o = c0 + tl.arange(0, 64)
                tl.store(arrive_ptr + o, tl.zeros((64,), dtype=tl.int32), mask=o < 2 * NCH)


SILU_BLOCK = 1024  # channels per step of the chunk's SiLU*mul (one program does the chunk: fewer, wider steps)


def mlp_supported(I: int, cfg_gu: GemvConfig, cfg_d: GemvConfig) -> bool:
    """The fused kernel needs whole gate tiles per h chunk (down's list segment a multiple of gate|up's block_n)."""
    return cfg_gu.listed and cfg_d.listed and cfg_d.kr % cfg_gu.block_n == 0 and I % 8 == 0


def counter_buffer(I: int, hc: int, device) -> torch.Tensor:
    """Zeroed int32 counters: ticket, exits, per-chunk arrivals and ready flags (the kernel leaves them zeroed)."""
    return torch.zeros(2 + 2 * math.ceil(I / hc), device=device, dtype=torch.int32)


def launch_fused_mlp(glists: tuple[torch.Tensor, ...], wgu: torch.Tensor, td: torch.Tensor, wd: torch.Tensor,
                     cfg_gu: GemvConfig, cfg_d: GemvConfig, dlists: tuple[torch.Tensor, ...],
                     counters: torch.Tensor, h: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     occupancy: int = 0, n_sm: int | None = None, runner=None, pdl: bool = False) -> torch.Tensor:
    """glists = (idx [2, D], xv [2, D], cnt [2, D/kr_gu]): gate|up's input lists; wgu [D, 2I]; td [1, I] down's
    thresholds; wd [I, D]; dlists: down's list buffers (segments of cfg_d.kr) that the kernel fills; counters from
    `counter_buffer`. occupancy > 0: a persistent grid of that many programs per SM; 0: one program per item.
    Returns down's fp32 partials [ceil(I / cfg_d.kr) * cfg_d.split, 1, D] (h -> `h` if given)."""
    assert HAVE_TRITON, "triton is not installed"
    gidx, gxv, gcnt = glists
    didx, dxv, dcnt = dlists
    D, N2 = wgu.shape
    I = N2 // 2
    assert wd.shape == (I, D) and wgu.is_contiguous() and wd.is_contiguous() and gidx.shape == (2, D)
    assert mlp_supported(I, cfg_gu, cfg_d), "down's list segment must be a multiple of gate|up's block_n"
    nch = math.ceil(I / cfg_d.kr)
    assert dcnt.shape == (1, nch) and didx.shape == (1, I) and gcnt.shape == (2, math.ceil(D / cfg_gu.kr))
    assert counters.shape == (2 + 2 * nch,) and counters.dtype == torch.int32
    ns = gcnt.shape[1] * cfg_gu.split
    pg = torch.empty((ns, 1, N2), device=wgu.device, dtype=torch.float32)
    if h is None:
        h = torch.empty((1, I), device=wgu.device, dtype=wgu.dtype)
    if out is None:
        out = torch.empty((nch * cfg_d.split, 1, D), device=wgu.device, dtype=torch.float32)
    t_gu, t_d = math.ceil(I / cfg_gu.block_n), math.ceil(D / cfg_d.block_n)
    items = t_gu * 2 * ns + nch * cfg_d.split * t_d
    grid = items
    if occupancy > 0:
        if n_sm is None:
            n_sm = torch.cuda.get_device_properties(wgu.device).multi_processor_count if wgu.is_cuda else 4
        grid = max(1, min(items, n_sm * occupancy))
    kernel = _fused_mlp_kernel if runner is None else runner(_fused_mlp_kernel)
    kernel[(grid,)](
        gidx, gxv, gcnt, wgu, pg, td, h, didx, dxv, dcnt, wd, out, counters,
        D, I, nch, t_gu, t_d,
        NSEG_GU=gcnt.shape[1], SEG_GU=cfg_gu.kr, SPLIT_GU=cfg_gu.split, BN_GU=cfg_gu.block_n, BK_GU=cfg_gu.block_k,
        HC=cfg_d.kr, SPLIT_D=cfg_d.split, BN_D=cfg_d.block_n, BK_D=cfg_d.block_k,
        SB=min(SILU_BLOCK, cfg_d.kr), ALIGN_GU=_align([I, I]), PERSIST=occupancy > 0,
        num_warps=max(cfg_gu.num_warps, cfg_d.num_warps), num_stages=max(cfg_gu.num_stages, cfg_d.num_stages),
        **pdl_kwargs(pdl))
    return out


def reference_fused_mlp(glists: tuple[torch.Tensor, ...], wgu: torch.Tensor, td: torch.Tensor, wd: torch.Tensor,
                        cfg_gu: GemvConfig, cfg_d: GemvConfig, dlists: tuple[torch.Tensor, ...]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in PyTorch: (down's partials, h); fills dlists like the kernel."""
    from .decode_ops import silu_mul
    from .sparse_gemv import reference_gemv_list

    I = wgu.shape[1] // 2
    pg = reference_gemv_list(*glists, wgu, [I, I], cfg_gu)
    h = silu_mul(pg.to(wgu.device), I, wgu.dtype, lists=(td, cfg_d.kr, dlists))
    return reference_gemv_list(*dlists, wd, [wd.shape[1]], cfg_d), h


def fused_mlp(glists: tuple[torch.Tensor, ...], wgu: torch.Tensor, td: torch.Tensor, wd: torch.Tensor,
              cfg_gu: GemvConfig, cfg_d: GemvConfig, dlists: tuple[torch.Tensor, ...], counters: torch.Tensor,
              pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-1 sparse MLP from gate|up's input lists: (down's fp32 partials, h = SiLU(gate) * up). The persistent
    Triton kernel on CUDA, its PyTorch reference elsewhere (same results)."""
    if wgu.is_cuda and HAVE_TRITON:
        h = torch.empty((1, wd.shape[0]), device=wgu.device, dtype=wgu.dtype)
        return launch_fused_mlp(glists, wgu, td, wd, cfg_gu, cfg_d, dlists, counters, h=h, pdl=pdl), h
    return reference_fused_mlp(glists, wgu, td, wd, cfg_gu, cfg_d, dlists)
