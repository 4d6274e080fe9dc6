"""Compile the Triton kernels ahead of time for an H100/H200 (sm_90) on a machine without a GPU.

    python -m wisparse.kernels.aot            # every configuration the benchmark sweeps, and the decode kernels
    python -m wisparse.kernels.aot --v4       # only the version-4 step's kernels (fused attention, PDL builds)
    python -m wisparse.kernels.aot --v5       # only the version-5 step's persistent MLP kernel
    python -m wisparse.kernels.aot --loop     # main-loop SASS instructions per KB: list GEMV against dense

For each compiled variant it prints registers per thread, spills (local memory / stack bytes), shared memory, and
how the weight loads were compiled: `cp.async` (Triton's software pipeline: loads of later iterations in flight
while this one computes) or plain `ld.global` (and how many of those are 2-byte scalar loads, which is what
unaligned column offsets produce). It uses the triton wheel's own ptxas / cuobjdump, so no CUDA install is needed.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import decode_ops as dops
from . import sparse_gemv as sg

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# pointer types of the batch-1 list GEMV and of the static-address GEMV (bf16 weights)
LIST_PTRS = {"idx_ptr": "*i32", "xv_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*bf16", "out_ptr": "*fp32"}
GEMV_PTRS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "t_ptr": "*fp32", "out_ptr": "*fp32", "scratch_ptr": "*i32"}


def compile_sm90(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                 divisible: tuple[str, ...] = ()) -> dict:
    """Compile `kernel` for sm_90; arguments not in `pointers` / `constexprs` are i32 (those in `divisible`
    marked divisible by 16, as Triton's launcher specialises them). Returns resource use and load kinds."""
    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    # constexpr parameters left out take their defaults (else they would be typed i32 runtime arguments)
    constexprs = {**{n: p.default for n, p in params.items() if "constexpr" in str(p.annotation)
                     and p.default is not inspect.Parameter.empty}, **constexprs}
    sig = {n: pointers.get(n, "constexpr" if n in constexprs else ("fp32" if n in ("eps", "scale") else "i32"))
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in divisible}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(
        num_warps=num_warps, num_stages=num_stages, launch_pdl=bool(constexprs.get("PDL", False))))
    res = _cuobjdump(c.asm["cubin"], "-res-usage")
    use = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res))
    ptx = c.asm["ptx"]
    return {"regs": int(use.get("REG", -1)), "stack": int(use.get("STACK", -1)), "local": int(use.get("LOCAL", -1)),
            "smem": c.metadata.shared, "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "ld_global": len(re.findall(r"ld\.global", ptx)), "ld_b16": len(re.findall(r"ld\.global[.a-z]*\.b16", ptx)),
            "loop": loop_instructions(_cuobjdump(c.asm["cubin"], "-sass"))}


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_instructions(sass: str) -> dict:
    """The main loop of a SASS listing: the longest backward branch's body. Returns its instruction count (per warp
    per iteration) and the count of each opcode (predicates and modifiers dropped)."""
    lines = re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;", sass)
    body = (0, -1)
    for addr, ins in lines:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < int(addr, 16) and int(addr, 16) - int(m.group(1), 16) > body[1] - body[0]:
            body = (int(m.group(1), 16), int(addr, 16))
    ops = [re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for addr, ins in lines
           if body[0] <= int(addr, 16) <= body[1]]
    counts: dict = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return {"instructions": len(ops), "ops": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def loop_report() -> list[dict]:
    """Main-loop instructions per KB of weights read, for the batch-1 list GEMV and the dense GEMV in the shipped
    sm_90 configurations (the table in NOTES_gpu, session 8): instructions per warp per iteration x warps / KB per
    iteration."""
    lst, dense = LIST_PTRS, GEMV_PTRS
    rows = []
    for label, kern, ptr, const, nw, ns in (
            ("list gate/up bn128 bk32 st8, 2 sub-lists", sg._gemv_list_kernel, lst,
             dict(SEG=1024, SPLIT=1, BLOCK_N=128, BLOCK_K=32, ALIGN=8, R=2, PDL=True), 4, 8),
            ("list down bn128 bk32 st8, 4 sub-lists", sg._gemv_list_kernel, lst,
             dict(SEG=2048, SPLIT=1, BLOCK_N=128, BLOCK_K=32, ALIGN=8, R=4, PDL=True), 4, 8),
            ("list q/k/v, o bn64 bk64 st5, 2 sub-lists", sg._gemv_list_kernel, lst,
             dict(SEG=1024, SPLIT=1, BLOCK_N=64, BLOCK_K=64, ALIGN=8, R=2, PDL=True), 4, 5),
            ("dense gate/up bn128 bk64 st3", sg._sparse_gemv_kernel, dense,
             dict(ALIGN=8, KR=512, BLOCK_N=128, BLOCK_K=64, CHUNK=512, BLOCK_B=16, DENSE=True, USE_DOT=True,
                  COMPACT=False, PREFETCH=False, PDL=True), 4, 3)):
        r = compile_sm90(kern, ptr, const, nw, ns, divisible=("K", "N"))
        kb = const["BLOCK_N"] * const["BLOCK_K"] * 2 / 1024
        rows.append({"label": label, "regs": r["regs"], "loop_instructions": r["loop"]["instructions"],
                     "per_kb": r["loop"]["instructions"] * nw / kb, "top_ops": list(r["loop"]["ops"].items())[:6]})
        print(f"{label:44s} regs {r['regs']:3d}  loop {r['loop']['instructions']:4d} instr/warp/iter  "
              f"{rows[-1]['per_kb']:5.1f} warp-instr per KB  {rows[-1]['top_ops']}", flush=True)
    return rows


def _list_variants():
    """(label, kernel, pointers, constexprs, warps, stages) of every listed-mode configuration the sweep runs."""
    from ..engine.bench import SWEEP_LIST

    ptr = LIST_PTRS
    seen = set()
    for c in SWEEP_LIST:
        cfg = _cfg(c)
        key = (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split > 1)
        if key in seen:
            continue
        seen.add(key)
        for r in (1, 2, 4):  # whole segments, and 2 or 4 sub-lists per segment (the engine's producers)
            yield (f"gemv_list bn={cfg.block_n} bk={cfg.block_k} w={cfg.num_warps} st={cfg.num_stages} "
                   f"split={cfg.split} sub-lists={r}", sg._gemv_list_kernel, ptr,
                   dict(SEG=cfg.kr, SPLIT=cfg.split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ALIGN=8, R=r),
                   cfg.num_warps, cfg.num_stages)


def _cfg(c):
    from .ops import config_from_list

    return config_from_list(list(c))


def _old_variants():
    from ..engine.bench import SWEEP_BATCH, SWEEP_DENSE, SWEEP_SPARSE

    ptr = GEMV_PTRS
    seen = set()
    for group, dense, bb in ((SWEEP_SPARSE, False, 16), (SWEEP_DENSE, True, 16), (SWEEP_BATCH, False, 16)):
        for c in group:
            cfg = _cfg(c)
            if cfg.listed:
                continue
            key = (cfg, dense)
            if key in seen:
                continue
            seen.add(key)
            mode = "dense" if dense else ("compact" + ("+prefetch" if cfg.prefetch else "") if cfg.compact
                                          else "masked" + ("" if cfg.skip_rows else " (every row)"))
            label = f"gemv {mode} bn={cfg.block_n} kr={cfg.kr} bk={cfg.block_k} w={cfg.num_warps} st={cfg.num_stages}"
            yield (label, sg._sparse_gemv_kernel, ptr,
                   dict(ALIGN=8, KR=cfg.kr, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, CHUNK=min(cfg.kr, cfg.chunk),
                        BLOCK_B=bb, DENSE=dense, USE_DOT=True, COMPACT=cfg.compact, PREFETCH=cfg.prefetch,
                        SKIP_ROWS=cfg.skip_rows),
                   cfg.num_warps, cfg.num_stages)


def _test_variants():
    """What the GPU tests also launch: the FMA path, and unaligned widths (ALIGN 1: scalar loads, not pipelined)."""
    ptr = GEMV_PTRS
    for compact, align in ((True, 8), (True, 1), (False, 1)):
        yield (f"gemv FMA {'compact' if compact else 'masked'} bn=128 kr=512 bk=32 align={align}",
               sg._sparse_gemv_kernel, ptr,
               dict(ALIGN=align, KR=512, BLOCK_N=128, BLOCK_K=32, CHUNK=512, BLOCK_B=1, DENSE=False, USE_DOT=False,
                    COMPACT=compact, PREFETCH=False), 4, 2)
    ptr = {"idx_ptr": "*i32", "xv_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*fp16", "out_ptr": "*fp32"}
    yield ("gemv_list fp16 bn=256 bk=32 w=8 st=8 split=3 align=1", sg._gemv_list_kernel, ptr,
           dict(SEG=512, SPLIT=3, BLOCK_N=256, BLOCK_K=32, ALIGN=1), 8, 8)


def _decode_variants():
    lst = {"t_ptr": "*fp32", "idx_ptr": "*i32", "xv_ptr": "*fp32", "cnt_ptr": "*i32"}
    for D in (4096, 3584):
        for seg in (256, 512, 1024, 2048, 4096):
            for P, S in ((0, 28), (3, 14), (2, 8)):
                if P == 0 and seg != 4096:
                    continue
                ns = dops._np2(-(-D // seg))
                yield (f"add_rmsnorm D={D} seg={seg} lists={P} partials={S}", dops._add_rmsnorm_kernel,
                       {"h_ptr": "*bf16", "p_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16", **lst},
                       dict(S=S, HAS_P=True, NS=ns, SEG=seg, P_LIST=P), 16, 1)
    for S, has_p in ((8, True), (7, True), (4, True), (0, False)):  # the split norm (default)
        yield (f"add_sumsq block={dops.SUMSQ_BLOCK} partials={S}", dops._add_sumsq_kernel,
               {"h_ptr": "*bf16", "p_ptr": "*fp32", "ss_ptr": "*fp32"},
               dict(S=max(S, 1), HAS_P=has_p, BLOCK=dops.SUMSQ_BLOCK), 2, 1)
    for D in (4096, 3584):
        for seg, P in ((1024, 0), (256, 3), (512, 3), (1024, 3), (2048, 3), (1024, 2), (2048, 2), (4096, 3)):
            nb = -(-D // dops.SUMSQ_BLOCK)
            yield (f"norm_lists D={D} seg={seg} lists={P}", dops._norm_lists_kernel,
                   {"h_ptr": "*bf16", "ss_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16", **lst},
                   dict(NB_P2=dops._np2(nb), SEG=seg, P_LIST=P), 4 if seg <= 1024 else 8, 1)
    for block, lists in ((1024, False), (512, True), (1024, True), (2048, True)):
        for S in (2, 4):
            yield (f"silu_mul block={block} list={lists} partials={S}", dops._silu_mul_kernel,
                   {"p_ptr": "*fp32", "out_ptr": "*bf16", **lst}, dict(S=S, BLOCK=block, LIST=lists),
                   4 if block <= 1024 else 8, 1)
    for seg in (128, 256, 512, 1024, 2048):
        yield (f"compact seg={seg}", sg._compact_kernel, {"x_ptr": "*bf16", **lst}, dict(SEG=seg),
               4 if seg <= 1024 else 8, 1)


def _v4_variants():
    """Version 4 (opt-in step): the fused attention kernels, and the PDL builds of the kernels it shares."""
    att = {"p_ptr": "*fp32", "bias_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64",
           "kc_ptr": "*bf16", "vc_ptr": "*bf16", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
    for S, bias, G in ((4, False, 4), (8, False, 4), (2, False, 4), (7, True, 7), (4, True, 7)):
        yield (f"v4 attn_qkv_split S={S} bias={bias} G={G} PDL", dops._attn_qkv_split_kernel, att,
               dict(S=S, HAS_BIAS=bias, G=G, BLOCK_G=16, BLOCK_L=64, D=128, PDL=True), 4, 3)
    comb = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": "*bf16", "t_ptr": "*fp32",
            "idx_ptr": "*i32", "xv_ptr": "*fp32", "cnt_ptr": "*i32"}
    for seg, G, bs in ((128, 4, 8), (128, 4, 64), (128, 7, 8), (512, 4, 8), (1024, 4, 8), (512, 7, 16)):
        yield (f"v4 attn_combine_list seg={seg} G={G} splits<={bs} PDL", dops._attn_combine_list_kernel, comb,
               dict(G=G, BLOCK_G=16, NH=seg // 128, D=128, BLOCK_S=bs, PDL=True), 4 if seg <= 1024 else 8, 3)
    for S in (1, 4, 8):
        yield (f"v4 sum_partials S={S} PDL", dops._sum_partials_kernel, {"p_ptr": "*fp32", "out_ptr": "*bf16"},
               dict(S=S, BLOCK=1024, PDL=True), 4, 1)
    yield ("v4 argmax blocks PDL", dops._argmax_blocks_kernel,
           {"x_ptr": "*bf16", "val_ptr": "*fp32", "idx_ptr": "*i32"}, dict(BLOCK=1024, PDL=True), 4, 1)
    for adv in (False, True):
        yield (f"v4 argmax final advance={adv} PDL", dops._argmax_final_kernel,
               {"val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "tok_ptr": "*i64", "gen_ptr": "*i64",
                "step_ptr": "*i64", "pos_ptr": "*i64"}, dict(BLOCK_B=2, BLOCK=128, ADVANCE=adv, PDL=True), 4, 1)
    yield ("v4 attn_combine (batch > 1) PDL", dops._attn_combine_kernel,
           {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": "*bf16"},
           dict(G=4, BLOCK_G=16, BLOCK_S=8, D=128, PDL=True), 4, 3)
    for label, kern, ptr, const, nw, ns in (*_list_variants(), *_decode_variants()):
        if "lists=0" in label or "list=False" in label:
            continue
        yield ("v4 " + label + " PDL", kern, ptr, {**const, "PDL": True}, nw, ns)
    dense = GEMV_PTRS
    yield ("v4 gemv dense bn=128 kr=1024 bk=64 w=4 st=3 PDL", sg._sparse_gemv_kernel, dense,
           dict(ALIGN=8, KR=1024, BLOCK_N=128, BLOCK_K=64, CHUNK=1024, BLOCK_B=16, DENSE=True, USE_DOT=True,
                COMPACT=False, PREFETCH=False, PDL=True), 4, 3)


def _v5_variants():
    """Version 5 (opt-in step): the persistent batch-1 MLP kernel, with the configurations run 6's sweep chose for
    Llama-3.1-8B (gate|up segment 1024, down's h chunk 2048, BLOCK_K 32, 8 stages) and neighbours."""
    from . import fused_mlp as fm

    ptr = {"gidx_ptr": "*i32", "gxv_ptr": "*fp32", "gcnt_ptr": "*i32", "wgu_ptr": "*bf16", "pg_ptr": "*fp32",
           "td_ptr": "*fp32", "h_ptr": "*bf16", "didx_ptr": "*i32", "dxv_ptr": "*fp32", "dcnt_ptr": "*i32",
           "wd_ptr": "*bf16", "out_ptr": "*fp32", "ctr_ptr": "*i32"}
    for nseg, bk, st, persist in ((4, 32, 8, False), (4, 32, 8, True), (4, 64, 5, False), (4, 32, 5, False),
                                  (8, 32, 8, False)):
        yield (f"v5 fused_mlp nseg_gu={nseg} bk={bk} st={st} persist={persist} PDL", fm._fused_mlp_kernel, ptr,
               dict(NSEG_GU=nseg, SEG_GU=4096 // nseg, SPLIT_GU=1, BN_GU=128, BK_GU=bk, HC=2048, SPLIT_D=1, BN_D=128,
                    BK_D=bk, SB=fm.SILU_BLOCK, ALIGN_GU=8, PERSIST=persist, PDL=True), 4, st)


def main(v4_only: bool = False, v5_only: bool = False) -> list[dict]:
    """Compile and report every variant (`--v4`: only version 4's; `--v5`: only version 5's)."""
    rows = []
    variants = ((*_v5_variants(),) if v5_only else (*_v4_variants(),) if v4_only else
                (*_list_variants(), *_old_variants(), *_test_variants(), *_decode_variants(), *_v4_variants(),
                 *_v5_variants()))
    for label, kern, ptr, const, nw, ns in variants:
        try:
            r = compile_sm90(kern, ptr, const, nw, ns, divisible=("K", "N", "D", "I", "W0", "W1", "stride_xb"))
            line = (f"{label:62s} regs {r['regs']:3d}  spill(local {r['local']}, stack {r['stack']})  "
                    f"smem {r['smem']:6d}  cp.async {r['cp_async']:3d}  ld.global {r['ld_global']:3d} "
                    f"(2-byte {r['ld_b16']})")
        except Exception as e:  # report and go on
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            line = f"{label:62s} FAILED {r['error']}"
        print(line, flush=True)
        rows.append({"label": label, **r})
    return rows


if __name__ == "__main__":
    import sys

    if "--loop" in sys.argv[1:]:
        loop_report()
    else:
        main(v4_only="--v4" in sys.argv[1:], v5_only="--v5" in sys.argv[1:])
