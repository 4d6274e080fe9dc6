"""The persistent batch-1 MLP kernel (version 5): reference on CPU, Triton interpreter, and (gpu) Triton."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from wisparse.kernels.fused_mlp import counter_buffer, mlp_supported, reference_fused_mlp
from wisparse.kernels.sparse_gemv import GemvConfig, list_buffers, reference_compact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp_case(D, I, sparsity, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, D, generator=g, device=device).to(dtype)
    wgu = (torch.randn(D, 2 * I, generator=g, device=device) * 0.05).to(dtype)
    wd = (torch.randn(I, D, generator=g, device=device) * 0.05).to(dtype)
    q = torch.tensor(sparsity, device=device)
    tg = torch.stack([x.float().abs().quantile(q).expand(D) * (0.8 + 0.4 * torch.rand(D, generator=g, device=device))
                      for _ in range(2)]) if sparsity > 0 else torch.full((2, D), -1.0, device=device)
    return x, wgu, wd, tg


def test_reference_matches_float64_composition():
    """gate|up on x's survivors, SiLU*mul, down on h's survivors, against float64 with the same masks."""
    D, I = 96, 160
    x, wgu, wd, tg = _mlp_case(D, I, 0.5, torch.float32)
    cg = GemvConfig(block_n=32, kr=32, block_k=16, listed=True, split=2)
    cd = GemvConfig(block_n=32, kr=64, block_k=16, listed=True)
    td = torch.full((1, I), 0.02)
    dl = list_buffers(1, I, cd.kr, "cpu")
    out, h = reference_fused_mlp(reference_compact(x, tg, cg.kr), wgu, td, wd, cg, cd, dl)
    xd = x.double()
    gate = (xd * (x.abs() > tg[0])) @ wgu[:, :I].double()
    up = (xd * (x.abs() > tg[1])) @ wgu[:, I:].double()
    h64 = torch.nn.functional.silu(gate) * up
    assert (h.double() - h64).abs().max() < 1e-5 * h64.abs().max()
    kept = h.abs() > td
    assert 0.1 < kept.float().mean() < 0.9  # actually sparse
    ref = (h.double() * kept) @ wd.double()
    assert out.shape == (3, 1, D)
    assert ((out.sum(0).double() - ref).norm() / ref.norm()) < 1e-6
    assert torch.equal(dl[2], reference_compact(h, td, cd.kr)[2])


def test_supported_shapes_and_counters():
    assert mlp_supported(14336, GemvConfig(block_n=128, kr=1024, listed=True), GemvConfig(kr=2048, listed=True))
    assert not mlp_supported(14336, GemvConfig(block_n=128, listed=True), GemvConfig(kr=64, listed=True))
    assert not mlp_supported(14336, GemvConfig(block_n=128), GemvConfig(kr=2048, listed=True))  # not listed
    c = counter_buffer(18944, 2048, "cpu")
    assert c.shape == (2 + 2 * 10,) and int(c.abs().sum()) == 0


INTERP = textwrap.dedent("""
    import sys, torch
    from wisparse.kernels.interpreter import patch_interpreter
    patch_interpreter()
    from wisparse.kernels import decode_ops as ops
    from wisparse.kernels.fused_mlp import counter_buffer, launch_fused_mlp
    from wisparse.kernels.sparse_gemv import GemvConfig, launch_gemv_list, list_buffers, reference_compact
    torch.manual_seed(0)
    ok = True
    ops._use_triton = lambda _: True
    # (D, I, gate|up: block_n, kr, split, block_k; down: block_n, kr (h chunk), split, block_k; programs per "SM")
    for (D, I, bg, kg, sg, kbg, bd, hc, sd, kbd, occ) in ((128, 200, 16, 64, 2, 16, 32, 64, 2, 16, 1),
                                                          (96, 256, 32, 32, 1, 16, 16, 128, 1, 32, 3)):
        x = torch.randn(1, D).half()
        tg = torch.rand(2, D) * 1.2
        wgu, wd = (torch.randn(D, 2 * I) * 0.3).half(), (torch.randn(I, D) * 0.3).half()
        td = torch.rand(1, I) * 0.3
        cg = GemvConfig(block_n=bg, kr=kg, block_k=kbg, listed=True, split=sg)
        cd = GemvConfig(block_n=bd, kr=hc, block_k=kbd, listed=True, split=sd)
        gl = reference_compact(x, tg, kg)
        dl_ref = list_buffers(1, I, hc, "cpu")  # the unfused step: list GEMV, silu_mul (+ lists), list GEMV
        h_ref = ops.silu_mul(launch_gemv_list(*gl, wgu, [I, I], cg), I, torch.float16, lists=(td, hc, dl_ref))
        out_ref = launch_gemv_list(*dl_ref, wd, [D], cd)
        ctr = counter_buffer(I, hc, "cpu")
        for rep, o in enumerate((occ, occ, 0, 0)):  # one program per item (0) or persistent; a second launch
            dl = list_buffers(1, I, hc, "cpu")      # checks that the kernel left its counters zeroed
            h = torch.full((1, I), float("nan")).half()
            out = launch_fused_mlp(gl, wgu, td, wd, cg, cd, dl, ctr, h=h, occupancy=o, n_sm=2)
            ok &= (torch.equal(out, out_ref) and torch.equal(h, h_ref) and torch.equal(dl[2], dl_ref[2])
                   and int(ctr.abs().sum()) == 0 and 0 < int(dl[2].sum()) < I)
            print(rep, (out - out_ref).abs().max().item(), ctr.tolist(), int(dl[2].sum()))
    sys.exit(0 if ok else 1)
""")


def test_triton_interpreter_equals_unfused_step():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", INTERP], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("D,I", [(4096, 14336), (3584, 18944), (512, 1536)])
def test_gpu_fused_mlp_equals_unfused_launches(D, I):
    """Bitwise equal to gemv_list + silu_mul + gemv_list with the same configurations, at 0 / 50 / 90% sparsity,
    direct and PDL launches, and in a CUDA graph replayed 20 times (a race in the hand-over would show as a
    difference in some replay)."""
    from wisparse.kernels import decode_ops as ops
    from wisparse.kernels.fused_mlp import launch_fused_mlp
    from wisparse.kernels.sparse_gemv import launch_compact, launch_gemv_list

    cg = GemvConfig(block_n=128, kr=1024, block_k=32, num_stages=8, listed=True)
    cd = GemvConfig(block_n=128, kr=2048, block_k=32, num_stages=8, listed=True)
    for sp in (0.0, 0.5, 0.9):
        x, wgu, wd, tg = _mlp_case(D, I, sp, torch.bfloat16, device="cuda", seed=int(sp * 10))
        gl = launch_compact(x, tg, cg.kr)
        dl_ref = list_buffers(1, I, cd.kr, "cuda")
        m = ops.silu_mul(launch_gemv_list(*gl, wgu, [I, I], cg), I, torch.bfloat16, lists=None)
        td = (m.float().abs().quantile(sp) if sp > 0 else torch.tensor(-1.0, device="cuda")).expand(1, I).contiguous()
        h_ref = ops.silu_mul(launch_gemv_list(*gl, wgu, [I, I], cg), I, torch.bfloat16, lists=(td, cd.kr, dl_ref))
        out_ref = launch_gemv_list(*dl_ref, wd, [D], cd)
        ctr = counter_buffer(I, cd.kr, "cuda")
        for pdl, occ in ((False, 0), (True, 0), (True, 3)):  # one program per item, or persistent
            dl = list_buffers(1, I, cd.kr, "cuda")
            h = torch.empty_like(h_ref)
            out = launch_fused_mlp(gl, wgu, td, wd, cg, cd, dl, ctr, h=h, pdl=pdl, occupancy=occ)
            assert torch.equal(out, out_ref) and torch.equal(h, h_ref) and torch.equal(dl[2], dl_ref[2]), (sp, pdl)
            assert int(ctr.abs().sum()) == 0
        out = torch.empty_like(out_ref)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch_fused_mlp(gl, wgu, td, wd, cg, cd, dl, ctr, out=out, pdl=True)
        for _ in range(20):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, out_ref), sp
        assert int(ctr.abs().sum()) == 0
