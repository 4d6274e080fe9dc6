"""Sparse GEMV and decode kernels: CPU reference path, custom-op tracing, Triton interpreter, and (gpu) Triton."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from wisparse.kernels import GemvConfig, reference_sparse_gemv, sparse_linear
from wisparse.kernels.ops import get_config, reference_partials
from wisparse.sparse_linear import SparseLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(K, widths, B, sparsity, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.rand(K, generator=g, device=device) + 0.5
    x = (torch.randn(B, K, generator=g, device=device) * scale).to(dtype)
    wt = (torch.randn(K, sum(widths), generator=g, device=device) * 0.1).to(dtype)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + sparsity / 2)).item() if sparsity > 0 else -1
    t = (scale * z).expand(len(widths), K).contiguous() * (torch.rand(len(widths), K, generator=g, device=device) + 0.5)
    return x, wt, t.float()


def _ref64(x, wt, t, widths, dense=False):
    return reference_sparse_gemv(x.double(), wt.double(), t.double(), widths, dense=dense, dtype=torch.float64)


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("widths", [[48], [40, 24], [64, 16, 16]])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_cpu_op_matches_float64(B, widths, sparsity):
    x, wt, t = _case(200, widths, B, sparsity, torch.float32, seed=B + len(widths))
    out = torch.ops.wisparse.sparse_gemv(x, wt, t, widths, False)
    assert out.dim() == 3 and out.shape[1:] == (B, sum(widths))
    ref = _ref64(x, wt, t, widths)
    assert ((out.sum(0).double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("seg,split,block_k", [(64, 1, 16), (128, 3, 32), (1024, 2, 64), (256, 1, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_cpu_listed_reference_matches_float64(seg, split, block_k, sparsity):
    """Listed mode's semantics (survivor lists per segment, split-K walk) on CPU: lists, partial count, result."""
    from wisparse.kernels.sparse_gemv import num_splits, reference_compact, reference_gemv_list

    widths = [40, 24, 16]
    x, wt, t = _case(700, widths, 1, sparsity, torch.float32, seed=seg + split)
    cfg = GemvConfig(block_n=32, kr=seg, block_k=block_k, listed=True, split=split)
    idx, xv, cnt = reference_compact(x, t, seg)
    keep = x.abs() > t  # [P, K]
    for p in range(len(widths)):
        for s_ in range(cnt.shape[1]):
            ks = torch.nonzero(keep[p, s_ * seg:(s_ + 1) * seg]).flatten() + s_ * seg
            assert torch.equal(idx[p, s_ * seg: s_ * seg + len(ks)].long(), ks) and int(cnt[p, s_]) == len(ks)
            assert torch.equal(xv[p, s_ * seg: s_ * seg + len(ks)], x[0, ks])
    out = reference_gemv_list(idx, xv, cnt, wt, widths, cfg)
    assert out.shape == (num_splits(700, 80, 1, cfg), 1, 80)
    ref = _ref64(x, wt, t, widths)
    assert ((out.sum(0).double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("seg,sub,split", [(256, 64, 1), (512, 128, 2), (128, 32, 3), (512, 256, 2)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_cpu_sub_lists_match_whole_segments(seg, sub, split, sparsity):
    """Lists written as sub-lists (more, smaller producer programs) give the GEMV the same partials as whole-segment
    lists, bitwise (the same survivors in the same order), and match float64; K = 700 leaves a partial last
    segment and a partial last sub-list."""
    from wisparse.kernels.sparse_gemv import reference_compact, reference_gemv_list

    widths = [40, 24]
    x, wt, t = _case(700, widths, 1, sparsity, torch.float32, seed=seg + sub)
    cfg = GemvConfig(block_n=32, kr=seg, block_k=16, listed=True, split=split)
    whole = reference_gemv_list(*reference_compact(x, t, seg), wt, widths, cfg)
    subs = reference_compact(x, t, sub)
    assert subs[2].shape == (2, -(-700 // sub))
    out = reference_gemv_list(*subs, wt, widths, cfg, sub=sub)
    assert torch.equal(out, whole)
    ref = _ref64(x, wt, t, widths)
    assert ((out.sum(0).double() - ref).norm() / ref.norm()) < 1e-6


def test_cpu_partials_layout_and_dense():
    x, wt, t = _case(300, [32, 32], 2, 0.5, torch.float32)
    kr = get_config(300, 64, 2).kr
    p = reference_partials(x, wt, t, [32, 32], True, kr)
    assert p.shape[0] == math.ceil(300 / kr)
    ref = _ref64(x, wt, t, [32, 32], dense=True)
    assert torch.allclose(p.sum(0).double(), ref, rtol=1e-5, atol=1e-5)


def test_sparse_linear_matches_sparselinear_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    mod = SparseLinear(lin)
    thr = torch.rand(96) * 0.8
    mod.set_threshold(thr)
    x = torch.randn(5, 96)
    want = mod(x)
    got = sparse_linear(x, lin.weight.t().contiguous(), thr[None].float(), [40], bias=lin.bias)
    assert torch.allclose(got, want, atol=1e-5)


def test_compile_fullgraph_traces_op():
    x, wt, t = _case(128, [32, 16], 2, 0.5, torch.float32)

    def f(x):
        return torch.ops.wisparse.sparse_gemv(x, wt, t, [32, 16], False).sum(0).relu()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(got, f(x))


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


INTERP = textwrap.dedent("""
    import torch, sys
    from wisparse.kernels.interpreter import patch_interpreter
    patch_interpreter()
    from wisparse.kernels.sparse_gemv import GemvConfig, launch_sparse_gemv, reference_sparse_gemv
    from wisparse.kernels import decode_ops as ops
    torch.manual_seed(0)
    worst = 0.0
    cases = []
    for compact, prefetch in ((True, False), (True, True), (False, False)):
        kw = dict(compact=compact, prefetch=prefetch)
        cases += [
            (1, 300, [64, 32, 32], False, GemvConfig(block_n=32, kr=128, block_k=16, chunk=64, use_dot=False, **kw),
             torch.bfloat16),
            (1, 300, [64, 32, 32], False, GemvConfig(block_n=32, kr=128, block_k=16, chunk=64, **kw), torch.float16),
            (3, 300, [64, 32, 32], False, GemvConfig(block_n=32, kr=128, block_k=16, chunk=64, **kw), torch.float16),
            (1, 256, [80], True, GemvConfig(block_n=32, kr=128, block_k=16, chunk=128, **kw), torch.float16),
            (8, 200, [40, 24], False, GemvConfig(block_n=16, kr=64, block_k=32, chunk=32, **kw), torch.float16)]
    cases += [(B, 300, [64, 32, 32], False, GemvConfig(block_n=32, kr=128, block_k=16, compact=False,
                                                      skip_rows=False), torch.float16) for B in (1, 3, 8)]
    for (B, K, widths, dense, cfg, dt) in cases:
        N = sum(widths)
        x = torch.randn(B, K).to(dt)
        wt = torch.randn(K, N).to(dt)
        t = torch.rand(len(widths), K) * 1.5
        S = -(-K // cfg.kr)
        out = torch.full((S, B, N), float("nan"))
        launch_sparse_gemv(x, wt, t, widths, dense=dense, config=cfg, out=out)
        ref = reference_sparse_gemv(x.double(), wt.double(), t.double(), widths, dense=dense, dtype=torch.float64)
        worst = max(worst, ((out.sum(0).double() - ref).norm() / ref.norm()).item())
    # decode kernels against their references (fp32)
    use = ops._use_triton
    def both(fn, *a):
        ops._use_triton = lambda t: True
        r1 = fn(*[v.clone() if torch.is_tensor(v) else v for v in a])
        ops._use_triton = lambda t: False
        r2 = fn(*[v.clone() if torch.is_tensor(v) else v for v in a])
        return (r1 - r2).abs().max().item()
    B, H, Hkv, D, L, S = 2, 4, 2, 16, 40, 3
    e = [both(ops.add_rmsnorm, torch.randn(B, 24), torch.randn(S, B, 24), torch.randn(24), 1e-5),
         both(ops.qkv_rope_cache, torch.randn(S, B, (H + 2 * Hkv) * D), torch.randn((H + 2 * Hkv) * D),
              torch.randn(L, D), torch.randn(L, D), torch.tensor([7]), torch.randn(B, Hkv, L, D),
              torch.randn(B, Hkv, L, D), H, Hkv),
         both(ops.decode_attention, torch.randn(B, H, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D),
              torch.tensor([33]), 5),
         both(ops.decode_attention, torch.randn(B, H, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D),
              torch.tensor([39]), 0),
         both(ops.silu_mul, torch.randn(S, B, 100), 50, torch.float32)]
    # listed mode: compaction kernel (exact lists) and list GEMV (fp16 dot), every output slot poisoned first
    from wisparse.kernels.sparse_gemv import launch_compact, reference_compact, num_splits, list_buffers

    def same_lists(a, b, seg):  # equal counts, and equal indices and values in every segment's used slots
        if not torch.equal(a[2], b[2]):
            return False
        for p in range(a[2].shape[0]):
            for s_ in range(a[2].shape[1]):
                lo, c = s_ * seg, int(a[2][p, s_])
                if not (torch.equal(a[0][p, lo:lo + c], b[0][p, lo:lo + c])
                        and torch.equal(a[1][p, lo:lo + c], b[1][p, lo:lo + c])):
                    return False
        return True

    lists_ok = True
    for (K, widths, seg, split, bn, bk, dt) in ((300, [64, 32, 32], 128, 1, 32, 16, torch.float16),
                                                (512, [48], 64, 3, 16, 16, torch.float16),
                                                (700, [48], 512, 2, 16, 64, torch.float16),
                                                (1000, [40, 24], 256, 2, 32, 32, torch.float16),
                                                (333, [16, 8, 8], 128, 1, 16, 16, torch.bfloat16)):
        N = sum(widths)
        x = torch.randn(1, K).to(dt)
        wt = torch.randn(K, N).to(dt)
        t = torch.rand(len(widths), K) * 1.5
        lists_ok &= same_lists(launch_compact(x, t, seg), reference_compact(x, t, seg), seg)
        if dt == torch.bfloat16:  # the interpreter has no bf16 dot
            continue
        cfg = GemvConfig(block_n=bn, kr=seg, block_k=bk, listed=True, split=split)
        out = torch.full((num_splits(K, N, 1, cfg), 1, N), float("nan"))
        launch_sparse_gemv(x, wt, t, widths, config=cfg, out=out)
        ref = reference_sparse_gemv(x.double(), wt.double(), t.double(), widths, dtype=torch.float64)
        worst = max(worst, ((out.sum(0).double() - ref).norm() / ref.norm()).item())
    # sub-lists: the list GEMV walks a segment's sub-lists (written by the compaction kernel in blocks of `sub`) as
    # one list; K not a multiple of the segment or the sub-list; every output slot poisoned first
    from wisparse.kernels.sparse_gemv import launch_gemv_list
    for (K, widths, seg, sub, split, bn, bk) in ((700, [48], 512, 128, 2, 16, 64), (1000, [40, 24], 256, 64, 3, 32, 16),
                                                 (300, [64, 32, 32], 128, 64, 1, 32, 16),
                                                 (900, [32], 512, 256, 2, 32, 32)):
        N = sum(widths)
        x = torch.randn(1, K).to(torch.float16)
        wt = torch.randn(K, N).to(torch.float16)
        t = torch.rand(len(widths), K) * 1.5
        cfg = GemvConfig(block_n=bn, kr=seg, block_k=bk, listed=True, split=split)
        out = torch.full((num_splits(K, N, 1, cfg), 1, N), float("nan"))
        launch_gemv_list(*launch_compact(x, t, sub), wt, widths, cfg, out=out, sub=sub)
        ref = reference_sparse_gemv(x.double(), wt.double(), t.double(), widths, dtype=torch.float64)
        worst = max(worst, ((out.sum(0).double() - ref).norm() / ref.norm()).item())
    pp = torch.randn(3, 2, 1500)
    ops._use_triton = lambda _: True
    e.append((ops.sum_partials(pp, torch.float32) - pp.sum(0)).abs().max().item())
    ops._use_triton = use
    # producers that also write the lists (add_rmsnorm: one row in segments of 32 over D = 100; silu_mul: blocks of
    # 64 over I = 150): the lists are those of the kernel's own output; fp32 outputs equal the references'
    for dt in (torch.float32, torch.bfloat16):
        D, P, seg = 100, 3, 32
        h, pp, w = torch.randn(1, D).to(dt), torch.randn(2, 1, D), torch.randn(D).to(dt)
        t = (torch.rand(P, D) * 1.2).to(dt).float()
        ops._use_triton = lambda _: True
        bufs = list_buffers(P, D, seg, "cpu")
        y = ops.add_rmsnorm(h.clone(), pp, w, 1e-5, lists=(t, seg, bufs))
        lists_ok &= same_lists(bufs, reference_compact(y, t, seg), seg)
        if dt == torch.float32:
            e.append(both(ops.add_rmsnorm, h, pp, w, 1e-5))
        I, seg = 150, 64
        pp = torch.randn(2, 1, 2 * I)
        t = (torch.rand(1, I) * 0.3).to(dt).float()
        ops._use_triton = lambda _: True
        bufs = list_buffers(1, I, seg, "cpu")
        y = ops.silu_mul(pp, I, dt, lists=(t, seg, bufs))
        lists_ok &= same_lists(bufs, reference_compact(y, t, seg), seg) and 0 < int(bufs[2].sum()) < I
        if dt == torch.float32:
            e.append(both(ops.silu_mul, pp, I, dt))
    # the split norm (two launches of many programs) against the one-program kernel: same h, output and lists
    for (B, D, P, seg, blk, has_p) in ((2, 300, 0, None, 64, True), (1, 300, 3, 64, 32, True),
                                       (1, 300, 2, 128, 32, False), (1, 100, 2, 32, 128, True)):
        ops._use_triton = lambda _: True
        ops.SUMSQ_BLOCK = blk
        h, pp, w = torch.randn(B, D), torch.randn(3, B, D) if has_p else None, torch.randn(D)
        t = torch.rand(max(P, 1), D) * 0.8
        res = []
        for mode in ("row", "split"):
            hh = h.clone()
            bufs = list_buffers(P, D, seg, "cpu") if P else None
            y = ops.add_rmsnorm(hh, pp, w, 1e-5, lists=(t, seg, bufs) if P else None, mode=mode)
            res.append((hh, y, bufs))
        for r in res[1:]:
            e += [(r[0] - res[0][0]).abs().max().item(), (r[1] - res[0][1]).abs().max().item()]
            if P:
                lists_ok &= (same_lists(r[2], reference_compact(r[1], t, seg), seg)
                             and same_lists(r[2], res[0][2], seg) and 0 < int(r[2][2].sum()) < P * D)
    ops.SUMSQ_BLOCK = 256
    # version 4: attention_fused (split kernel makes q, k, v and writes the caches; combine, or at batch 1 the
    # combine that writes o's survivor lists) against qkv_rope_cache + decode_attention (+ compaction), fp32
    for (B, H, Hkv, D, L, S, pos, win, bias, seg) in ((2, 4, 2, 16, 40, 3, 7, 0, True, None),
                                                      (1, 8, 2, 16, 130, 3, 129, 0, True, 64),
                                                      (1, 6, 3, 32, 200, 2, 150, 20, False, 128)):
        p = torch.randn(S, B, (H + 2 * Hkv) * D)
        bb = torch.randn((H + 2 * Hkv) * D) if bias else None
        cos, sin, ps = torch.randn(L, D), torch.randn(L, D), torch.tensor([pos])
        kc, vc = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
        t = torch.rand(1, H * D) * 0.8
        got = []
        for tri in (True, False):
            ops._use_triton = lambda _, tri=tri: tri
            k2, v2 = kc.clone(), vc.clone()
            bufs = list_buffers(1, H * D, seg, "cpu") if seg else None
            o = ops.attention_fused(p, bb, cos, sin, ps, k2, v2, H, Hkv, win, lists=(t, seg, bufs) if seg else None,
                                    split_l=64)
            got.append((o, k2, v2, bufs))
        (o1, k1, v1, b1), (o2, k2, v2, _) = got
        e += [(o1 - o2).abs().max().item(), (k1 - k2).abs().max().item(), (v1 - v2).abs().max().item()]
        if seg:
            lists_ok &= same_lists(b1, reference_compact(o1, t, seg), seg) and 0 < int(b1[2].sum()) < H * D
    # argmax of logit rows (own generator: the global random stream above stays as it was)
    lg = torch.randn(3, 3000, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    lg[1, 2500] = lg[1, 700] = lg[1, 1900] = 9.0  # ties across blocks: the first index wins, as in torch
    lg[2, 1030] = lg[2, 1029] = 9.0  # ties inside a block
    ops._use_triton = lambda _: True
    am = ops.argmax_rows(lg)
    argmax_ok = torch.equal(am, lg.argmax(-1)) and am.tolist()[1:] == [700, 1029]
    # with the greedy loop's bookkeeping (tokens, output column at step, step and pos advanced), twice
    got = []
    for tri in (True, False):
        ops._use_triton = lambda _, tri=tri: tri
        st = (torch.zeros(3, dtype=torch.long), torch.full((3, 4), -1), torch.tensor([3]), torch.tensor([10]))
        for row in (lg, lg.flip(1)):
            ops.argmax_rows(row.contiguous(), advance=st)
        got.append(st)
    argmax_ok &= all(torch.equal(a, b) for a, b in zip(*got)) and got[0][2].item() == 5 and got[0][3].item() == 12
    ops._use_triton = use
    print("WORST", worst, max(e), "lists identical", lists_ok, "argmax", argmax_ok)
    sys.exit(0 if worst < 1e-6 and max(e) < 1e-5 and lists_ok and argmax_ok else 1)
""")


@pytest.mark.skipif(not _has_triton(), reason="triton not installed")
def test_triton_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter (bf16 dot excluded: the interpreter lacks it)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", INTERP], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


# -------------------------------------------------------------------------------------------------------------------
# GPU
# -------------------------------------------------------------------------------------------------------------------
GPU_CONFIGS = [None, GemvConfig(block_n=64, kr=256, block_k=32, compact=True),
               GemvConfig(block_n=128, kr=1024, block_k=64, compact=True, prefetch=True, num_stages=1),
               GemvConfig(block_n=128, kr=512, block_k=64, compact=False, num_stages=3),
               GemvConfig(block_n=128, kr=512, block_k=32, use_dot=False, compact=True),
               GemvConfig(block_n=128, kr=1024, block_k=64, num_stages=5, listed=True),
               GemvConfig(block_n=128, kr=4096, block_k=64, num_stages=8, listed=True, split=2),
               GemvConfig(block_n=256, kr=512, block_k=32, num_warps=8, num_stages=8, listed=True, split=3),
               GemvConfig(block_n=128, kr=512, block_k=64, compact=False, num_stages=3, skip_rows=False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_gpu_kernel_random_shapes(dtype, B):
    from wisparse.kernels.sparse_gemv import launch_sparse_gemv, num_splits

    rng = torch.Generator().manual_seed(B)
    for c in range(10):
        K = int(torch.randint(16, 6000, (1,), generator=rng))
        widths = [int(torch.randint(1, 3000, (1,), generator=rng)) for _ in range(1 + c % 3)]
        sp = [0.0, 0.3, 0.5, 0.7, 0.9, 0.97][c % 6]
        cfg = GPU_CONFIGS[c % len(GPU_CONFIGS)]
        x, wt, t = _case(K, widths, B, sp, dtype, device="cuda", seed=c)
        for dense in (False, True):
            cfg_ = cfg or get_config(K, sum(widths), B, dense)
            out = torch.full((num_splits(K, sum(widths), B, cfg_, dense), B, sum(widths)), float("nan"),
                             device="cuda")
            launch_sparse_gemv(x, wt, t, widths, dense=dense, config=cfg_, out=out)
            ref = _ref64(x, wt, t, widths, dense=dense)
            assert not torch.isnan(out).any()
            err = ((out.sum(0).double() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (K, widths, B, sp, dense, cfg_, err)


@pytest.mark.gpu
def test_gpu_pdl_launches_match_float64():
    """The version-4 step's GEMV launches (programmatic dependent launch: list GEMV, dense and listed through
    launch_sparse_gemv) give the same results as without PDL and match float64, inside a CUDA graph too."""
    from wisparse.kernels.sparse_gemv import launch_compact, launch_gemv_list, launch_sparse_gemv, num_splits

    rng = torch.Generator().manual_seed(7)
    for c in range(6):
        K = int(torch.randint(64, 6000, (1,), generator=rng))
        widths = [int(torch.randint(1, 400, (1,), generator=rng)) * 8 for _ in range(1 + c % 3)]
        x, wt, t = _case(K, widths, 1, [0.3, 0.5, 0.9][c % 3], torch.bfloat16, device="cuda", seed=c)
        cfg = GPU_CONFIGS[5 + c % 3]
        dense = c % 2 == 1
        ref = _ref64(x, wt, t, widths, dense=dense)
        outs = []
        for pdl in (False, True):
            out = torch.full((num_splits(K, sum(widths), 1, cfg, dense), 1, sum(widths)), float("nan"), device="cuda")
            launch_sparse_gemv(x, wt, t, widths, dense=dense, config=cfg, out=out, pdl=pdl)
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
        assert ((outs[1].sum(0).double() - ref).norm() / ref.norm()).item() < 1e-5
        if not dense:  # list GEMV with PDL replayed in a graph, after the compaction launch
            lists = launch_compact(x, t, cfg.kr, pdl=True)  # compiled and loaded before the capture
            launch_gemv_list(*lists, wt, widths, cfg, pdl=True)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = launch_gemv_list(*launch_compact(x, t, cfg.kr, bufs=lists, pdl=True), wt, widths, cfg, pdl=True)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, outs[0])
            # the same lists written as sub-lists (the engine's producers): same survivors, same order, same bits
            sub = cfg.kr // 4
            out_sub = launch_gemv_list(*launch_compact(x, t, sub, pdl=True), wt, widths, cfg, pdl=True, sub=sub)
            assert torch.equal(out_sub, outs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_attention_fused_matches_reference(pdl):
    """Version 4's attention at engine shapes (Llama: H 32, Hkv 8; Qwen2: H 28, Hkv 4 with bias) against
    qkv_rope_cache + decode_attention references: o, both caches, and o's survivor lists (batch 1)."""
    from wisparse.kernels import decode_ops as ops
    from wisparse.kernels.sparse_gemv import list_buffers, reference_compact

    torch.manual_seed(0)
    dt = torch.bfloat16
    use = ops._use_triton
    cu = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    try:
        for B, H, Hkv, bias, seg, L, pos, win in ((1, 32, 8, False, 512, 448, 383, 0), (1, 32, 8, False, 2048, 4200, 4100, 0),
                                                  (1, 28, 4, True, 1024, 700, 63, 0), (2, 32, 8, False, None, 700, 699, 256),
                                                  (1, 28, 4, True, 512, 300, 0, 0)):
            D = 128
            p, bb = cu(4, B, (H + 2 * Hkv) * D), cu((H + 2 * Hkv) * D).to(dt) if bias else None
            cos, sin, ps = cu(L, D), cu(L, D), torch.tensor([pos], device="cuda")
            kc, vc = cu(B, Hkv, L, D).to(dt), cu(B, Hkv, L, D).to(dt)
            t = (torch.rand(1, H * D, device="cuda") * 0.8).to(dt).float()
            res = []
            for tri in (True, False):
                ops._use_triton = lambda _, tri=tri: tri
                k2, v2 = kc.clone(), vc.clone()
                bufs = list_buffers(1, H * D, seg, "cuda") if seg else None
                o = ops.attention_fused(p, bb, cos, sin, ps, k2, v2, H, Hkv, win, lists=(t, seg, bufs) if seg else None,
                                        pdl=pdl and tri)
                res.append((o.float(), k2.float(), v2.float(), bufs))
            for a, b in zip(res[0][:3], res[1][:3]):
                assert ((a - b).norm() / b.norm()).item() < 1e-2
            if seg:
                bufs, o = res[0][3], res[0][0].to(dt)
                want = reference_compact(o, t, seg)
                used = torch.arange(H * D, device="cuda")[None] % seg < bufs[2].repeat_interleave(seg, 1)[:, :H * D]
                assert torch.equal(bufs[2], want[2]) and torch.equal(bufs[0][used], want[0][used])
                assert torch.equal(bufs[1][used], want[1][used])
    finally:
        ops._use_triton = use


@pytest.mark.gpu
def test_gpu_op_under_torch_compile():
    x, wt, t = _case(4096, [1024, 512], 1, 0.5, torch.bfloat16, device="cuda")

    def f(x):
        return torch.ops.wisparse.sparse_gemv(x, wt, t, [1024, 512], False).sum(0).to(x.dtype) * 2

    got = torch.compile(f, fullgraph=True)(x)
    ref = _ref64(x, wt, t, [1024, 512]) * 2
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_ops_match_reference():
    from wisparse.kernels import decode_ops as ops

    torch.manual_seed(0)
    dt = torch.bfloat16
    B, H, Hkv, D, L, S = 2, 8, 2, 128, 700, 3
    use = ops._use_triton
    try:
        def both(fn, *a):
            ops._use_triton = lambda t: True
            r1 = fn(*[v.clone() if torch.is_tensor(v) else v for v in a])
            ops._use_triton = lambda t: False
            r2 = fn(*[v.clone() if torch.is_tensor(v) else v for v in a])
            return ((r1.float() - r2.float()).norm() / r2.float().norm()).item()

        cu = lambda *s: torch.randn(*s, device="cuda")
        assert both(ops.add_rmsnorm, cu(B, 4096).to(dt), cu(S, B, 4096), cu(4096).to(dt), 1e-5) < 1e-2
        assert both(ops.qkv_rope_cache, cu(S, B, (H + 2 * Hkv) * D), cu((H + 2 * Hkv) * D).to(dt), cu(L, D), cu(L, D),
                    torch.tensor([300], device="cuda"), cu(B, Hkv, L, D).to(dt), cu(B, Hkv, L, D).to(dt), H, Hkv) < 1e-2
        for pos, win in ((0, 0), (299, 0), (699, 0), (699, 256)):
            assert both(ops.decode_attention, cu(B, H, D).to(dt), cu(B, Hkv, L, D).to(dt), cu(B, Hkv, L, D).to(dt),
                        torch.tensor([pos], device="cuda"), win) < 1e-2
        assert both(ops.silu_mul, cu(S, B, 2 * 14336), 14336, dt) < 1e-2
        # batch 1 with survivor lists written by the producers (engine shapes): lists equal the kernel output's
        from wisparse.kernels.sparse_gemv import list_buffers, reference_compact

        ops._use_triton = use
        for D, P, seg in ((4096, 3, 256), (3584, 2, 1024), (4096, 1, 4096)):
            t = (torch.rand(P, D, device="cuda") * 1.2).to(dt).float()
            bufs = list_buffers(P, D, seg, "cuda")
            h = cu(1, D).to(dt)
            y = ops.add_rmsnorm(h.clone(), cu(S, 1, D), cu(D).to(dt), 1e-5, lists=(t, seg, bufs))
            want = reference_compact(y, t, seg)
            assert torch.equal(bufs[2], want[2])
            for a, b in zip(bufs[:2], want[:2]):  # used slots only
                used = torch.arange(D, device="cuda")[None] % seg < bufs[2].repeat_interleave(seg, 1)[:, :D]
                assert torch.equal(a[used], b[used])
        for I, seg in ((14336, 1024), (18944, 2048)):
            t = (torch.rand(1, I, device="cuda") * 0.3).to(dt).float()
            bufs = list_buffers(1, I, seg, "cuda")
            y = ops.silu_mul(cu(2, 1, 2 * I), I, dt, lists=(t, seg, bufs))
            want = reference_compact(y, t, seg)
            used = torch.arange(I, device="cuda")[None] % seg < bufs[2].repeat_interleave(seg, 1)[:, :I]
            assert torch.equal(bufs[2], want[2]) and torch.equal(bufs[0][used], want[0][used])
            assert torch.equal(bufs[1][used], want[1][used])
    finally:
        ops._use_triton = use



def test_shipped_tuned_table_installs_without_overriding():
    """The shipped sm_90 table (benchmarks/loop_tuned_configs.py) parses into valid configurations covering the
    Llama-3.1-8B / Mistral-7B groups at batch 1 and 2-8, dense and sparse; installing it keeps configurations that
    were already set (a sweep, set_config) and fills the rest."""
    import json

    from wisparse.kernels import ops as kops

    saved = dict(kops._CONFIGS)
    try:
        kops._CONFIGS.clear()
        path = os.path.join(ROOT, "wisparse", "kernels", kops.TUNED_TABLES[(9, 0)])
        with open(path) as f:
            table = json.load(f)["configs"]
        mine = GemvConfig(block_n=32, kr=256, block_k=16)
        kops.set_config(4096, 6144, 1, False, mine)
        n = kops.install_table(table, overwrite=False)
        assert kops.get_config(4096, 6144, 1, False) is mine  # kept
        assert n == sum(1 if k.split("|")[1] == "1" else 7 for k in table) - 1
        for K, N in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):  # q|k|v, o, gate|up, down
            for B in (1, 2, 8):
                for dense in (False, True):
                    assert (K, N, B, dense) in kops._CONFIGS
        # batch-1 sparse entries walk survivor lists (the engine's producers write them); dense ones never do
        assert all(kops.config_from_list(v["config"]).listed == k.endswith("|1|0") for k, v in table.items())
        assert kops.get_config(4096, 4096, 1, False) == kops.config_from_list(table["4096x4096x1|1|0"]["config"])
    finally:
        kops._CONFIGS.clear()
        kops._CONFIGS.update(saved)


def test_trace_bookkeeping_gives_each_launch_its_own_records():
    """`sparse_gemv.TRACE` (diagnosis only): off, the launch arguments compile the stamps out; on, each launch gets
    its own slice of the buffer and a log entry, and a full buffer is an error, not an overwrite."""
    from wisparse.kernels import sparse_gemv as sg

    dummy = torch.zeros(1)
    assert sg._trace_args("list", (4, 2), dummy) == {"trace_ptr": dummy, "TRACE": False}
    sg.TRACE = {"buf": torch.zeros(100, dtype=torch.int64), "next": 0, "log": []}
    try:
        a = sg._trace_args("list", (4, 2), dummy, K=8)
        b = sg._trace_args("dense", (2, 2), dummy)
        assert a["TRACE"] and b["TRACE"]
        assert a["trace_ptr"].data_ptr() == sg.TRACE["buf"].data_ptr()
        assert b["trace_ptr"].data_ptr() == sg.TRACE["buf"][8 * sg.TRACE_FIELDS:].data_ptr()
        assert [e["offset"] for e in sg.TRACE["log"]] == [0, 8 * sg.TRACE_FIELDS] and sg.TRACE["log"][0]["K"] == 8
        with pytest.raises(RuntimeError, match="TRACE buffer full"):
            sg._trace_args("list", (10, 1), dummy)
        assert len(sg.TRACE["log"]) == 2
    finally:
        sg.TRACE = None


def test_per_sm_trace_ranks_programs_by_launch_order_on_their_sm():
    """benchmarks/per_sm_trace.py (offline diagnosis of `--trace` records): programs are ranked on their SM by
    launch order (pid_n fastest), an SM ends with its last program, and its rate is rows over that end."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("per_sm_trace", os.path.join(ROOT, "benchmarks", "per_sm_trace.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # [pid_n, pid_s, entry, wait, count, end, sm, rows]: grid (2, 2); SM 7 runs (1, 0) then (0, 1), SM 3 the rest
    recs = [[0, 0, 0, 0, 0, 4.0, 3, 100], [1, 0, 0, 0, 0, 6.0, 7, 100],
            [0, 1, 0, 0, 0, 9.0, 7, 200], [1, 1, 0, 0, 0, 8.0, 3, 300]]
    s = mod.per_sm(recs)
    assert s["sms"] == 2 and s["programs_per_sm"] == {2: 2}
    assert s["sm_end_us"] == (8.0, 8.5, 9.0)
    assert s["end_by_rank_us"] == [5.0, 8.5]  # rank 0: (0, 0) on SM 3 and (1, 0) on SM 7
    assert s["rows_per_us_per_sm"] == (300 / 9.0, (400 / 8.0 + 300 / 9.0) / 2, 400 / 8.0)


def test_cta_cap_pads_shared_memory_to_exactly_that_many_ctas_per_sm():
    """`sparse_gemv.padded_smem` / `set_ctas_per_sm` (the PDL placement cap, CAP_CTAS): n CTAs fit on an SM and
    n + 1 do not; the kernel's own shared memory is never cut; the cap is undone with 0."""
    from wisparse.kernels import sparse_gemv as sg

    per_sm = 228 * 1024
    for n in range(1, 9):
        s = sg.padded_smem(n, 8192, per_sm)
        assert n * (s + 1024) <= per_sm < (n + 1) * (s + 1024) and s >= 8192
    assert sg.padded_smem(2, 150_000, per_sm) == 150_000

    class FakeCompiled:
        function = 1234
        packed_metadata = (4, 1, 20_000)

    calls = []
    ck = FakeCompiled()
    sg.set_ctas_per_sm(ck, 3, per_sm, set_attr=lambda *a: calls.append(a))
    assert ck.packed_metadata == (4, 1, sg.padded_smem(3, 20_000, per_sm))
    assert [c[1] for c in calls] == [8, 9] and calls[0][2] == ck.packed_metadata[2]
    sg.set_ctas_per_sm(ck, 0, per_sm, set_attr=lambda *a: calls.append(a))
    assert ck.packed_metadata == (4, 1, 20_000)
    sg.set_ctas_per_sm(ck, 3, per_sm, set_attr=lambda *a: calls.append(a))  # the attribute is already large enough
    assert len(calls) == 2 and ck.packed_metadata[2] > 20_000


def test_cta_cap_is_set_before_each_launch_of_a_shared_compiled_kernel(monkeypatch):
    """`_launch_capped`: a compiled kernel that serves two launches with different caps is launched with each one's
    own shared memory size (a graph capture records it per launch); the first launch runs as compiled."""
    from wisparse.kernels import sparse_gemv as sg

    class FakeCompiled:
        function = 1
        packed_metadata = (4, 1, 1000)

    ck, seen = FakeCompiled(), []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, ck.packed_metadata[2]))
                return ck
            return launch

    per_sm = 228 * 1024
    monkeypatch.setattr(sg, "_cu_set_attr", lambda *a: None)
    monkeypatch.setattr(sg, "_LAUNCHED", {})
    monkeypatch.setattr(sg, "_sm_info", lambda device: (132, per_sm))  # an H200
    dev = torch.device("cuda", 0)  # only its type is read
    for grid, key in (((384,), "a"), ((256,), "b"), ((384,), "a"), ((256,), "b"), ((384,), "a")):
        sg._launch_capped(FakeKernel(), grid, (key,), dev, True)
    three, two = sg.padded_smem(3, 1000, per_sm), sg.padded_smem(2, 1000, per_sm)
    assert [s for _, s in seen] == [1000, three, three, two, three]
    monkeypatch.setattr(sg, "CAP_CTAS", False)  # switched off: launched as compiled from the next launch on
    for _ in range(2):
        sg._launch_capped(FakeKernel(), (384,), ("a",), dev, True)
    assert seen[-1][1] == 1000


def test_sass_loop_counter_finds_the_longest_backward_branch():
    from wisparse.kernels.aot import loop_instructions

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/              @P0  HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0040*/              @!P1 BRA 0x30 ;
        /*0050*/              @!P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
    """
    loop = loop_instructions(sass)
    assert loop["instructions"] == 5
    assert loop["ops"] == {"BRA": 2, "LDG": 1, "HMMA": 1, "IADD3": 1}


@pytest.mark.skipif(not _has_triton(), reason="triton not installed")
def test_aot_builds_the_list_gemv_for_sm90_without_a_gpu():
    """`python -m wisparse.kernels.aot` (resource use and SASS of the kernels, compiled for sm_90 on this machine)
    was broken by a rename in session 7 that no test saw. One list-GEMV build: registers, no spills, a software
    pipeline (cp.async), a main loop with tensor-core MMAs; constexprs left out take their defaults (TRACE off)."""
    from wisparse.kernels import aot
    from wisparse.kernels import sparse_gemv as sg

    ptr = {"idx_ptr": "*i32", "xv_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*bf16", "out_ptr": "*fp32"}
    r = aot.compile_sm90(sg._gemv_list_kernel, ptr, dict(SEG=1024, SPLIT=1, BLOCK_N=64, BLOCK_K=64, ALIGN=8, R=2),
                         4, 5, divisible=("K", "N"))
    assert r["regs"] > 0 and r["local"] == 0 and r["cp_async"] > 0
    assert r["loop"]["instructions"] > 0 and r["loop"]["ops"].get("HMMA", 0) > 0
    label, kern, _, const, _, _ = next(aot._list_variants())  # the sweep's configurations parse
    assert kern is sg._gemv_list_kernel and const["SEG"] >= 128 and label.startswith("gemv_list")


def test_trace_record_width_matches_the_kernels():
    """`_trace_store` writes TRACE_FIELDS int64s per program (a literal in the kernel: Triton reads no host global)."""
    import inspect

    from wisparse.kernels import sparse_gemv as sg

    if not sg.HAVE_TRITON:
        pytest.skip("triton not installed")
    body = inspect.getsource(sg._trace_store.fn)
    assert f"* {sg.TRACE_FIELDS}" in body and f"base + {sg.TRACE_FIELDS - 1}" in body
