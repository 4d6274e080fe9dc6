"""Decode-speed benchmark: kernels inside CUDA graphs, and the graph-captured decode loop, dense vs sparse.

`run(...)` writes one JSON (every number) and a Markdown summary. Dense = the fastest dense path measured in the same
loop (cuBLAS `F.linear` on the same weights, or the Triton kernel with the threshold test compiled out).
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from ..kernels import ops as kops
from ..kernels import sparse_gemv as sg
from ..kernels.sparse_gemv import (GemvConfig, default_config, is_listed, launch_compact, launch_gemv_list,
                                   launch_sparse_gemv, num_splits)

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _graph_time(fn, launches: int = 10, replays: int = 15) -> float:
    """Median seconds of one call of fn, timed as replays of a CUDA graph holding `launches` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / launches)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return nbytes / statistics.median(ts)


def _inputs(K: int, B: int, P: int, sparsity: float, n: int, dtype, gen) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n activation sets x [B, K] (per-channel scales, never zero) and thresholds [P, K] giving ~`sparsity`."""
    scale = torch.rand(K, device="cuda", generator=gen) * 1.5 + 0.25
    xs = [(torch.randn(B, K, device="cuda", generator=gen) * scale).to(dtype) for _ in range(n)]
    if sparsity <= 0:
        t = torch.full((P, K), -1.0, device="cuda")
    else:
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + sparsity / 2)).item()
        t = (scale * z).expand(P, K).contiguous()
        t = t * (1 + 0.05 * torch.randn(P, K, device="cuda", generator=gen)).abs()
    return xs, t


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
_WCACHE: dict = {}


def _weights(K: int, N: int, dtype, transposed: bool = True) -> list[torch.Tensor]:
    """Enough random weight copies ([K, N], or [N, K] for F.linear) to exceed the 60 MB L2 together (~200 MB)."""
    key = (K, N, dtype, transposed)
    if key not in _WCACHE:
        _WCACHE.clear()
        gen = torch.Generator(device="cuda").manual_seed(K * 7 + N)
        nw = max(1, math.ceil(200e6 / (K * N * 2)))
        shape = (K, N) if transposed else (N, K)
        _WCACHE[key] = [(torch.randn(*shape, device="cuda", generator=gen) * 0.05).to(dtype) for _ in range(nw)]
    return _WCACHE[key]


# (block_n, kr, block_k, num_warps, num_stages, use_dot, compact, prefetch[, listed, split])
# Batch 1 sparse: the two best of run 2 (compact 38 us, masked 53 us at 50% on 4096x14336) against listed mode
# (survivor lists from the producer kernel; kr = list segment). Listed candidates whose grid is far from ~3 programs
# per SM, or whose partial count S would make the consumer's sum slow, are skipped per shape (`_fits`).
SWEEP_LIST = [
    (128, 1024, 64, 4, 5, True, False, False, True, 1), (128, 2048, 64, 4, 5, True, False, False, True, 1),
    (128, 512, 64, 4, 5, True, False, False, True, 1), (128, 4096, 64, 4, 8, True, False, False, True, 2),
    (256, 1024, 64, 8, 5, True, False, False, True, 1), (128, 1024, 32, 4, 8, True, False, False, True, 1),
    # more programs on short lists (q/k/v and o reached only 1.6-2.3 TB/s in run 3): narrower tiles, shorter
    # segments, two parts per segment
    (64, 512, 64, 4, 5, True, False, False, True, 1), (128, 256, 64, 4, 4, True, False, False, True, 1),
    (128, 1024, 64, 4, 5, True, False, False, True, 2),
    # long segments with more bytes in flight per program (the big shapes sat at 74.6-75.1% of copy bandwidth)
    (128, 2048, 32, 4, 8, True, False, False, True, 1), (128, 2048, 128, 8, 3, True, False, False, True, 1),
    # around run 6's winners (kr 1024-2048, BLOCK_K 32-64, 4 warps): pipeline depth, warps, whole-K lists in two
    # parts (2 partials), narrower tiles on long lists
    (128, 2048, 64, 4, 4, True, False, False, True, 1), (128, 2048, 64, 4, 6, True, False, False, True, 1),
    (128, 2048, 64, 8, 5, True, False, False, True, 1), (128, 1024, 64, 8, 5, True, False, False, True, 1),
    (128, 4096, 64, 4, 5, True, False, False, True, 2), (128, 4096, 32, 4, 8, True, False, False, True, 2),
    (64, 2048, 64, 4, 5, True, False, False, True, 1), (128, 1024, 32, 4, 10, True, False, False, True, 1),
]
SWEEP_SPARSE = [(128, 512, 64, 4, 3, True, False, False), (128, 512, 64, 4, 2, True, True, False)] + SWEEP_LIST
SWEEP_DENSE = [
    (128, 1024, 64, 4, 3, True, False, False), (128, 512, 64, 4, 3, True, False, False),
    (64, 512, 64, 4, 4, True, False, False), (256, 1024, 64, 8, 3, True, False, False),
    (128, 2048, 128, 8, 3, True, False, False),
]
SWEEP_BATCH = [
    (128, 1024, 64, 4, 3, True, False, False), (128, 512, 64, 4, 3, True, False, False),
    (128, 512, 64, 4, 2, True, True, False), (128, 1024, 64, 4, 1, True, True, True),
    # every weight row read (no skipping on the union of the rows' masks, which is nearly dense at batch 8 and 50%):
    # the loads no longer wait on x and the threshold test, so they pipeline like the dense kernel's
    (128, 512, 64, 4, 3, True, False, False, False, 1, False), (128, 1024, 64, 4, 3, True, False, False, False, 1, False),
]
SWEEP = SWEEP_SPARSE + SWEEP_DENSE + SWEEP_BATCH


def config_from_spec(text: str, dense: bool = False) -> GemvConfig:
    """A batch-1 configuration from 'BLOCK_N,KR,BLOCK_K,WARPS,STAGES,SPLIT' (the timeline's variants): the list GEMV
    when sparse, static addresses when dense."""
    bn, kr, bk, nw, ns, split = (int(x) for x in text.split(","))
    return GemvConfig(block_n=bn, kr=kr, block_k=bk, chunk=min(kr, 1024), num_warps=nw, num_stages=ns, use_dot=True,
                      compact=False, listed=not dense, split=split)


def _mode(t) -> str:
    """Short tag of a sweep tuple: M masked, C compact, CP compact+prefetch, L listed (split s: Ls), MA masked
    reading every row."""
    if len(t) > 8 and t[8]:
        return "L" + (str(t[9]) if t[9] > 1 else "")
    return ("C" if t[6] else "M") + ("P" if t[7] else "") + ("A" if len(t) > 10 and not t[10] else "")


def _fits(K: int, N: int, t) -> bool:
    """Listed candidates: segment <= K rounded up to a power of two, 128..1536 programs, at most 32 partials."""
    cfg = kops.config_from_list(t)
    if not cfg.listed:
        return True
    S = math.ceil(K / cfg.kr) * cfg.split
    programs = math.ceil(N / cfg.block_n) * S
    return cfg.kr <= 1 << (K - 1).bit_length() and 128 <= programs <= 1536 and S <= 32


def check_kernel(n_cases: int = 16, seed: int = 0, log=print) -> dict:
    """Random shapes / dtypes / batch sizes / sparsities / configs vs a float64 reference; poisoned outputs."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    worst = 0.0
    fails = []
    for c in range(n_cases):
        K = int(torch.randint(16, 5000, (1,), generator=rng))
        P = int(torch.randint(1, 4, (1,), generator=rng))
        widths = [int(torch.randint(1, 1500, (1,), generator=rng)) for _ in range(P)]
        B = [1, 2, 3, 4, 5, 8][c % 6]
        dtype = [torch.bfloat16, torch.float16][c % 2]
        sp = [0.0, 0.3, 0.5, 0.7, 0.9, 0.99][c % 6]
        dense = c % 7 == 3
        cfg = kops.config_from_list(SWEEP[c % len(SWEEP)])
        N = sum(widths)
        wt = (torch.randn(K, N, device="cuda", generator=gen) * 0.05).to(dtype)
        xs, t = _inputs(K, B, P, sp, 1, dtype, gen)
        x = xs[0]
        S = num_splits(K, N, B, cfg, dense)
        out = torch.full((S, B, N), float("nan"), device="cuda")
        launch_sparse_gemv(x, wt, t, widths, dense=dense, config=cfg, out=out)
        torch.cuda.synchronize()
        y = out.sum(0).double()
        ref, c0 = [], 0
        for p, w in enumerate(widths):
            xm = x.double() if dense else x.double() * (x.abs().float() > t[p]).double()
            ref.append(xm @ wt[:, c0:c0 + w].double())
            c0 += w
        ref = torch.cat(ref, -1)
        err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        bad = not math.isfinite(err) or err > 1e-5 or bool(torch.isnan(out).any())
        worst = max(worst, err if math.isfinite(err) else float("inf"))
        if bad:
            fails.append(dict(K=K, widths=widths, B=B, dtype=str(dtype), sp=sp, dense=dense, cfg=asdict(cfg), err=err))
            log(f"FAIL {fails[-1]}")
    log(f"kernel check: {n_cases} cases, worst rel err {worst:.2e}, {len(fails)} failures")
    return {"cases": n_cases, "worst_rel_err": worst, "failures": fails}


def time_kernel(K: int, widths: list[int], B: int, sparsity: float, cfg: GemvConfig | None, dense: bool = False,
                dtype=torch.bfloat16, seed: int = 0, prelisted: bool = False) -> dict:
    """Median time of one sparse GEMV inside a CUDA graph (inputs rotated, weights rotated past the L2).
    prelisted (listed configurations): the survivor lists are computed before the graph and only the list GEMV is
    timed, as in the decode step where add_rmsnorm / silu_mul write them; else the compaction launch is included."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    N = sum(widths)
    wts = _weights(K, N, dtype)
    nw = len(wts)
    xs, t = _inputs(K, B, len(widths), 0.0 if dense else sparsity, 8, dtype, gen)
    cfg = cfg or default_config(K, N, B, dense=dense)
    if prelisted and is_listed(cfg, B, dense):
        lists = [launch_compact(x, t, cfg.kr) for x in xs]
        tm = _graph_time(lambda i: launch_gemv_list(*lists[i % len(xs)], wts[i % nw], widths, cfg))
    else:
        tm = _graph_time(lambda i: launch_sparse_gemv(xs[i % len(xs)], wts[i % nw], t, widths, dense=dense,
                                                      config=cfg))
    # bytes actually read: surviving rows (union over the batch) of each projection + x + thresholds + partials
    reads_all = dense or not (cfg.listed or cfg.compact or cfg.skip_rows)  # masked mode reading every row
    rows = 0
    for x in xs:
        c0 = 0
        for p, w in enumerate(widths):
            keep = torch.ones(K, dtype=torch.bool, device="cuda") if reads_all else (x.abs().float() > t[p]).any(0)
            rows += int(keep.sum()) * w
            c0 += w
    rows /= len(xs)
    S = num_splits(K, N, B, cfg, dense)
    nbytes = rows * 2 + B * K * 2 + len(widths) * K * 4 + S * B * N * 4
    realised = 1 - rows / (K * N)
    return {"us": tm * 1e6, "bytes_read": nbytes, "tbps": nbytes / tm / 1e12, "realised": realised}


def time_linear(K: int, N: int, B: int, dtype=torch.bfloat16, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    wbytes = K * N * 2
    ws = _weights(K, N, dtype, transposed=False)
    nw = len(ws)
    xs = [torch.randn(B, K, device="cuda", generator=gen).to(dtype) for _ in range(8)]
    tm = _graph_time(lambda i: F.linear(xs[i % 8], ws[i % nw]))
    return {"us": tm * 1e6, "tbps": (wbytes + B * K * 2 + B * N * 2) / tm / 1e12}


def sweep_configs(shapes: dict[str, tuple[int, list[int]]], log=print, fused: set[str] = frozenset(),
                  plans=None) -> dict:
    """Best config per (shape, batch, dense): batch 1 sparse at 50% (masked, compact and listed modes), batch 1
    dense, batch 8 sparse at 50% (also used dense for batches 2-8). lm_head shapes (one projection over 30k wide):
    dense only. Listed candidates of shapes in `fused` (inputs made by add_rmsnorm / silu_mul, which write the lists)
    are timed without the compaction launch; others (the o projection) with it. `plans`: (batch, dense, candidates)
    triples to sweep instead of those three."""
    best = {}
    for name, (K, widths) in shapes.items():
        head = len(widths) == 1 and widths[0] >= 30000
        N = sum(widths)
        for B, dense, cands in plans or ((1, False, SWEEP_SPARSE), (1, True, SWEEP_DENSE), (8, False, SWEEP_BATCH)):
            if head and not (dense and B == 1):
                continue
            res = []
            for c in cands:
                if B == 1 and not _fits(K, N, c):
                    continue
                try:
                    r = time_kernel(K, widths, B, 0.5, kops.config_from_list(c), dense=dense, prelisted=name in fused)
                    res.append((r["us"], c))
                except Exception as e:  # a config that does not compile / fit
                    log(f"  config {c} failed: {type(e).__name__}: {str(e)[:120]}")
            if not res:  # every candidate failed: this shape keeps the heuristic, the other shapes their sweep
                log(f"sweep {name} B={B} dense={dense}: no configuration ran")
                continue
            res.sort()
            us, c = res[0]
            log(f"sweep {name} B={B} dense={dense}: best {c} {us:.1f} us; "
                + ", ".join(f"{r[1][:3]}{_mode(r[1])}{'/' + str(r[1][4]) if _mode(r[1])[0] == 'L' else ''}"
                            f"={r[0]:.1f}" for r in res))
            entry = {"config": list(c), "us": us, "all": [[list(r[1]), r[0]] for r in res]}
            best[f"{name}|{B}|{int(dense)}"] = entry
            if B == 8:
                best[f"{name}|8|1"] = entry
    return best


def install_configs(best: dict, shapes: dict[str, tuple[int, list[int]]]) -> None:
    """Install the configurations of `best` (the sweep's format) whose shape is one of `shapes`."""
    kops.install_table({k: v for k, v in best.items() if k.split("|")[0] in shapes})


def engine_shapes(dec) -> dict[str, tuple[int, list[int]]]:
    lyr = dec.layers[0]
    return {g: (getattr(lyr, g).wt.shape[0], list(getattr(lyr, g).widths)) for g in ("qkv", "o", "gu", "down")}


# ----------------------------------------------------------------------------------------------------------------
# decode loop
# ----------------------------------------------------------------------------------------------------------------
def time_decode(gen, prompt: torch.Tensor, new_tokens: int, runs: int) -> dict:
    """Prefill once per run (timed separately), then new_tokens-1 graph replays; medians over runs (after warm-up)."""
    pre, dec_t, toks = [], [], None
    for r in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.prefill(prompt)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = gen.decode(new_tokens - 1)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if r > 0:  # run 0 is the warm-up
            pre.append(t1 - t0)
            dec_t.append(t2 - t1)
        toks = out.clone()
    d = statistics.median(dec_t)
    return {"prefill_ms": statistics.median(pre) * 1e3, "decode_s": d,
            "tok_s": (new_tokens - 1) / d, "tok_s_all_rows": (new_tokens - 1) * prompt.shape[0] / d,
            "runs_tok_s": [(new_tokens - 1) / x for x in dec_t], "tokens": toks}


def measure_realised(dec, gen, prompt, new_tokens) -> dict:
    """Re-run the same decode in a graph with counting ops added (same tokens, same masks); count dropped channels."""
    from .calibrate import realised

    dec.meter = torch.zeros(len(dec.layers), 4, 3, dtype=torch.float64, device=dec.device)
    try:
        gen.prefill(prompt)
        gen.graph = None
        gen.capture()  # a graph with the counting ops in it
        dec.meter.zero_()
        out = gen.decode(new_tokens - 1)
        torch.cuda.synchronize()
        r = realised(dec, dec.meter, (new_tokens - 1) * prompt.shape[0])
    finally:
        dec.meter = None
        gen.graph = None
    r["tokens"] = out.clone()
    return r


# ----------------------------------------------------------------------------------------------------------------
# the whole benchmark
# ----------------------------------------------------------------------------------------------------------------
def _shape_dims(name: str) -> dict[str, tuple[int, list[int]]]:
    from .shapes import hf_config

    c = hf_config(name)
    D, H, Hkv, I = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    Dh = getattr(c, "head_dim", None) or D // H
    return {"qkv": (D, [H * Dh, Hkv * Dh, Hkv * Dh]), "o": (H * Dh, [D]), "gu": (D, [I, I]), "down": (I, [D]),
            "lm_head": (D, [c.vocab_size])}


def _decode_rows(dec, gen, prompt, new_tokens, runs, label, log) -> dict:
    gen.graph = None
    r = time_decode(gen, prompt, new_tokens, runs)
    toks = r.pop("tokens")
    log(f"  {label:28s} B={prompt.shape[0]} ctx={prompt.shape[1]}: {r['tok_s']:7.1f} tok/s "
        f"(runs {', '.join(f'{x:.1f}' for x in r['runs_tok_s'])}), prefill {r['prefill_ms']:.1f} ms")
    r["tokens_head"] = toks[0, :8].tolist()
    r["_tokens"] = toks
    return r


def run(models=("llama-3.1-8b", "mistral-7b", "qwen2.5-7b"), batches=(1, 2, 4, 8), levels=(0.4, 0.5, 0.6),
        nonuniform: bool = True, contexts=(1024, 4096), prompt_len: int = 128, new_tokens: int = 256,
        context_new_tokens: int = 64, runs: int = 3, sweep: bool = True, configs_path: str | None = None,
        budget_s: float = 480.0, out_json: str | None = None, out_md: str | None = None, sweep_models=None,
        v4: bool = True, resweep: tuple[str, ...] = (), kernel_table: bool = True, norm_compare: bool = False,
        v5: bool = False, mlp_block: bool = False, bound: bool = True, log=print) -> dict:
    import traceback

    import triton

    t_start = time.time()
    left = lambda: budget_s - (time.time() - t_start)  # noqa: E731
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                   "cap_ctas_under_pdl": sg.CAP_CTAS},
           "protocol": {"prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs, "warmup_runs": 1,
                        "statistic": "median over runs of (new_tokens-1)/decode time; the first token comes from "
                                     "the prefill, which is timed separately",
                        "dtype": "bfloat16", "weights": "random normal std 0.02 (named shapes' real dimensions)",
                        "thresholds": "per-projection weight-aware (alpha=0.5) per-channel thresholds calibrated on "
                                      "decode tokens of 4 random prompts through the same model (2 passes)",
                        "positions": "all positions sparsified (prefill and decode)",
                        "realised": "parameter-weighted fraction of dropped input channels over the 7 projections, "
                                    "counted in a second capture of the same decode with counting ops added "
                                    "(same tokens checked)",
                        "context_rows": f"prompt of the given length, then {context_new_tokens} new tokens"},
           "errors": [], "decode": []}

    def save():
        """Written after every section and every decode row group (a timeout keeps what was measured). Each file
        is replaced atomically; a failure to render the Markdown is logged, never raised (the JSON has it all)."""
        res["elapsed_s"] = time.time() - t_start
        if out_json:
            with open(out_json + ".tmp", "w") as f:
                json.dump(res, f, indent=1, default=str)
            os.replace(out_json + ".tmp", out_json)
        if out_md:
            try:
                text = markdown(res)
            except Exception as e:  # noqa: BLE001 - a formatting bug must not end the run
                log(f"markdown failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                return
            with open(out_md + ".tmp", "w") as f:
                f.write(text)
            os.replace(out_md + ".tmp", out_md)

    def section(name, fn, *a):
        try:
            fn(*a)
        except Exception as e:  # record and go on: one broken section must not cost the rest of the lease
            tb = traceback.format_exc()
            log(f"SECTION {name} FAILED: {type(e).__name__}: {e}\n{tb}")
            res["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}", "traceback": tb[-3000:]})
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # noqa: BLE001 - a sticky CUDA error: record it, the next sections will tell
                log(f"synchronize after {name} failed: {type(e2).__name__}: {e2}")
        save()

    def on_term(signum, frame):  # `timeout` sends SIGTERM: keep what was measured, then exit at once
        try:  # whatever happens here (e.g. print re-entered), the process must not go on past the timeout
            res["errors"].append({"section": "run", "error": f"killed by signal {signum} after "
                                                             f"{time.time() - t_start:.0f} s (rows of the group in "
                                                             "progress are lost)"})
            save()
            log(f"signal {signum} after {time.time() - t_start:.0f} s: results saved, exiting")
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)

    # `timeout` sends SIGTERM: save what was measured and exit (the CLI run; restored when run returns)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if main_thread else None

    res["copy_tbps"] = copy_bandwidth() / 1e12
    log(f"GPU {res['env']['gpu']}, copy bandwidth {res['copy_tbps']:.2f} TB/s (read+write)")
    section("kernel_check", lambda: res.__setitem__("kernel_check", check_kernel(log=log)))

    sweep_shapes, fused = {}, set()
    for m in tuple(models[:1]) + tuple(sweep_models or ()):  # other models' shapes use the heuristic
        for g, v in _shape_dims(m).items():
            key = f"{v[0]}x{sum(v[1])}x{len(v[1])}"
            sweep_shapes[key] = v
            if g in ("qkv", "gu", "down"):  # the engine's add_rmsnorm / silu_mul write these inputs' lists
                fused.add(key)
    sweep_shapes["4096x14336x1"] = (4096, [14336])
    fused.add("4096x14336x1")

    def configs():
        if configs_path:
            with open(configs_path) as f:
                best = json.load(f)
            src = best.get("env", {}).get("date_utc", "") if isinstance(best.get("env"), dict) else ""
            note = f" ({best['note']})" if best.get("note") else (f" (a run of {src} UTC)" if src else "")
            res["protocol"]["configs_from"] = f"{configs_path}{note}"
            best = best.get("configs", best)  # a results JSON from an earlier run, or a bare configs dict
            redo = {k: v for k, v in sweep_shapes.items() if k in resweep}
            if redo:  # batch-1 sparse configurations of these shapes swept again (new candidates)
                best = {k: v for k, v in best.items() if not (k.split("|")[0] in redo and k.endswith("|1|0"))}
                best.update(sweep_configs(redo, log=log, fused=fused, plans=((1, False, SWEEP_SPARSE),)))
        elif sweep:
            best = sweep_configs(sweep_shapes, log=log, fused=fused)
        else:
            best = {}
        best = {k: v for k, v in best.items() if k.split("|")[0] in sweep_shapes}
        install_configs(best, sweep_shapes)
        res["configs"] = best

    section("configs", configs)
    res["kernels"] = []
    if kernel_table:
        section("kernel_table", _kernel_table, res, log)
    if models:
        section("step_breakdown", _step_breakdown, res, models[0], log, v4)
        if mlp_block:
            section("mlp_block", _mlp_block_table, res, models[0], log)
    # batch 1: every level for the first model, 50% for the others; then the first model's other batch sizes (50%)
    # and context lengths
    plan = [(mi, name, (1,), levels if mi == 0 else (tuple(lv for lv in levels if lv == 0.5) or levels[:1]),
             nonuniform and mi == 0, ()) for mi, name in enumerate(models)]
    rest_b = tuple(b for b in batches if b != 1)
    if models and (rest_b or contexts):
        plan.append((0, models[0], rest_b, tuple(lv for lv in levels if lv == 0.5) or levels[:1], False, contexts))
    for mi, name, bs, lvs, nonu, ctxs in plan:
        if left() < 60:
            log(f"budget: skipping {name} B={bs} contexts={ctxs}")
            res["errors"].append({"section": f"decode {name} B={bs} ctx={ctxs}", "error": "skipped: time budget"})
            continue
        section(f"decode {name} B={bs} ctx={ctxs}", _decode_model, res, mi, name, bs, lvs, nonu, ctxs, prompt_len,
                new_tokens, context_new_tokens, runs, left, log, v4, save, mi == 0, norm_compare, v5 and v4,
                bound and v4)
        torch.cuda.empty_cache()
    save()
    if main_thread:
        signal.signal(signal.SIGTERM, old_term)
    return res


def _kernel_table(res, log) -> None:
    """Acceptance shapes at sparsity 0..95% against F.linear (inside CUDA graphs)."""
    for label, K, widths in (("14336x4096 (gate/up: in 4096, out 14336)", 4096, [14336]),
                             ("4096x14336 (down: in 14336, out 4096)", 14336, [4096])):
        N = sum(widths)
        for B in (1, 8):
            lin = time_linear(K, N, B)
            res["kernels"].append({"matrix": label, "B": B, "path": "F.linear (cuBLAS)", "sparsity": 0.0, **lin})
            for sp in ((None, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95) if B == 1
                       else (None, 0.0, 0.5, 0.9)):
                dense = sp is None
                cfg = kops.get_config(K, N, B, dense)
                # listed: the GEMV alone (lists written by the producer kernel, as in the decode step), and at 0.5
                # also with the stand-alone compaction launch (what a caller without a fused producer pays)
                variants = [("triton dense" if dense else "triton sparse", False, cfg)]
                if is_listed(cfg, B, dense):
                    variants = [("triton sparse (lists)", True, cfg)] + ([("triton sparse + compact", False, cfg)]
                                                                         if sp in (0.0, 0.5, 0.9) else [])
                elif B > 1 and not dense and (cfg.skip_rows or cfg.compact):  # and reading every weight row
                    variants.append(("triton sparse (every row)", False,
                                     replace(cfg, compact=False, prefetch=False, skip_rows=False)))
                for path, pre, vcfg in variants:
                    r = time_kernel(K, widths, B, sp or 0.0, vcfg, dense=dense, prelisted=pre)
                    row = {"matrix": label, "B": B, "path": path, "sparsity": 0.0 if dense else sp, **r,
                           "copy_fraction": r["tbps"] / res["copy_tbps"], "vs_linear": lin["us"] / r["us"],
                           "config": asdict(vcfg)}
                    res["kernels"].append(row)
                    log(f"kernel {label[:10]} B={B} {row['path']:23s} sp={row['sparsity']:.2f} "
                        f"(realised {r['realised']:.3f}): {r['us']:7.1f} us {r['tbps']:.2f} TB/s "
                        f"({row['copy_fraction']:.0%} of copy), F.linear {lin['us']:.1f} us")


def time_mlp_block(D: int, I: int, sparsity: float, cfg_gu: GemvConfig, cfg_d: GemvConfig, fused: bool,
                   occupancy: int = 0, pdl: bool = True, seed: int = 0) -> dict:
    """Batch-1 MLP from gate|up's survivor lists to down's partials, inside a CUDA graph: three launches (list GEMV,
    silu_mul writing down's lists, list GEMV) or the persistent kernel (`fused_mlp`). Both `sparsity` of x and of
    h dropped (thresholds from h's own magnitudes); weights rotated past the L2."""
    from ..kernels.decode_ops import silu_mul
    from ..kernels.fused_mlp import counter_buffer, launch_fused_mlp
    from ..kernels.sparse_gemv import list_buffers

    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(seed)
    wgus = _weights(D, 2 * I, dt)
    wds = [(torch.randn(I, D, device="cuda", generator=gen) * 0.05).to(dt) for _ in range(len(wgus))]
    xs, tg = _inputs(D, 1, 2, sparsity, 4, dt, gen)
    gl = [launch_compact(x, tg, cfg_gu.kr) for x in xs]
    h = silu_mul(launch_gemv_list(*gl[0], wgus[0], [I, I], cfg_gu), I, dt)
    td = (h.float().abs().quantile(sparsity) if sparsity > 0 else torch.tensor(-1.0, device="cuda"))
    td = td.expand(1, I).contiguous()
    dl = list_buffers(1, I, cfg_d.kr, "cuda")
    ctr = counter_buffer(I, cfg_d.kr, "cuda")
    nw = len(wgus)

    def unfused(i):
        p = launch_gemv_list(*gl[i % 4], wgus[i % nw], [I, I], cfg_gu, pdl=pdl)
        silu_mul(p, I, dt, lists=(td, cfg_d.kr, dl), pdl=pdl)  # h itself is not read: down walks its lists
        return launch_gemv_list(*dl, wds[i % nw], [D], cfg_d, pdl=pdl)

    def one(i):
        return launch_fused_mlp(gl[i % 4], wgus[i % nw], td, wds[i % nw], cfg_gu, cfg_d, dl, ctr,
                                occupancy=occupancy, pdl=pdl)

    tm = _graph_time(one if fused else unfused)
    real_x = float(sum((x.abs().float() <= tg).float().mean() for x in xs) / len(xs))
    return {"us": tm * 1e6, "realised_x": real_x, "realised_h": float((h.abs().float() <= td).float().mean())}


def _mlp_block_table(res, name: str, log) -> None:
    """The MLP of one layer (batch 1) in three launches against the persistent kernel, at 0 / 50 / 90% (version 5)."""
    from ..kernels.fused_mlp import mlp_supported

    dims = _shape_dims(name)
    D, I = dims["gu"][0], dims["down"][0]
    cg, cd = kops.get_config(D, 2 * I, 1, False), kops.get_config(I, D, 1, False)
    if not mlp_supported(I, cg, cd):
        log(f"mlp block: configurations {cg} / {cd} not supported by the persistent kernel")
        return
    rows = res.setdefault("mlp_block", [])
    for sp in (0.0, 0.5, 0.9):
        three = time_mlp_block(D, I, sp, cg, cd, fused=False)
        rows.append({"model": name, "sparsity": sp, "path": "3 launches (PDL)", **three})
        log(f"mlp block {name} sp={sp:.2f} 3 launches: {three['us']:.1f} us (realised x {three['realised_x']:.3f}, "
            f"h {three['realised_h']:.3f})")
        for occ in (0, 3):
            r = time_mlp_block(D, I, sp, cg, cd, fused=True, occupancy=occ)
            path = f"one launch, persistent ({occ} programs/SM)" if occ else "one launch, one program per item"
            rows.append({"model": name, "sparsity": sp, "path": path, **r,
                         "vs_3_launches": three["us"] / r["us"]})
            log(f"mlp block {name} sp={sp:.2f} {path}: {r['us']:.1f} us "
                f"({three['us'] / r['us']:.3f}x of 3 launches)")


def _step_breakdown(res, name: str, log, v4: bool = False) -> None:
    """The decode step's small kernels at batch 1, each timed alone inside a CUDA graph, with the launch
    configurations the sweep installed (partial counts S, list segments) and ~50% survivors: where the non-GEMV
    time of a token goes (run 2: ~0.71 ms per token, ~22 us per layer, outside the GEMVs)."""
    from ..kernels import decode_ops as dops
    from ..kernels.sparse_gemv import list_buffers
    from .model import list_sub
    from .shapes import hf_config

    c = hf_config(name)
    D, H, Hkv, I = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    Dh = getattr(c, "head_dim", None) or D // H
    dims = _shape_dims(name)
    cfgs = {g: kops.get_config(K, sum(w), 1, False) for g, (K, w) in dims.items() if g != "lm_head"}
    S = {g: num_splits(dims[g][0], sum(dims[g][1]), 1, cfgs[g]) for g in cfgs}
    dt, dev = torch.bfloat16, "cuda"
    z = 0.6745  # |N(0, 1)| median: thresholds that keep about half of the channels

    def lists(g, K):  # sub-lists as the engine's producers write them
        P = len(dims[g][1])
        sub = list_sub(g, cfgs[g].kr, Dh)
        return (torch.full((P, K), z, device=dev), sub, list_buffers(P, K, sub, dev))

    L, pos = 448, torch.tensor([383], device=dev)
    kc = torch.randn(1, Hkv, L, Dh, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    cos, sin = torch.randn(L, Dh, device=dev), torch.randn(L, Dh, device=dev)
    h = torch.randn(1, D, device=dev, dtype=dt)
    w = torch.ones(D, device=dev, dtype=dt)
    p_o = torch.randn(S["o"], 1, D, device=dev)
    p_down = torch.randn(S["down"], 1, D, device=dev)
    p_qkv = torch.randn(S["qkv"], 1, (H + 2 * Hkv) * Dh, device=dev)
    p_gu = torch.randn(S["gu"], 1, 2 * I, device=dev)
    q = torch.randn(1, H, Dh, device=dev, dtype=dt)
    a = torch.randn(1, H * Dh, device=dev, dtype=dt)
    lq, lg, ld = (lists("qkv", D) if cfgs["qkv"].listed else None, lists("gu", D) if cfgs["gu"].listed else None,
                  lists("down", I) if cfgs["down"].listed else None)
    t_o = torch.full((1, H * Dh), z, device=dev)
    items = [
        ("add_rmsnorm (sum o partials, + gate/up lists)", lambda i: dops.add_rmsnorm(h, p_o, w, 1e-5, lists=lg)),
        ("add_rmsnorm (sum down partials, + qkv lists)", lambda i: dops.add_rmsnorm(h, p_down, w, 1e-5, lists=lq)),
        ("silu_mul (+ down lists)", lambda i: dops.silu_mul(p_gu, I, dt, lists=ld)),
        ("qkv_rope_cache", lambda i: dops.qkv_rope_cache(p_qkv, None, cos, sin, pos, kc, vc, H, Hkv)),
        ("decode_attention (context 384)", lambda i: dops.decode_attention(q, kc, vc, pos, 0)),
    ]
    if cfgs["o"].listed:
        items.append(("compaction of o's input", lambda i: launch_compact(a, t_o, cfgs["o"].kr)))
    v3_items = [  # the version-3 norm (one program per row), timed beside the split norm; not in the per-layer sum
        ("add_rmsnorm one-program (sum o partials, + gate/up lists)",
         lambda i: dops.add_rmsnorm(h, p_o, w, 1e-5, lists=lg, mode="row")),
        ("add_rmsnorm one-program (sum down partials, + qkv lists)",
         lambda i: dops.add_rmsnorm(h, p_down, w, 1e-5, lists=lq, mode="row"))]
    v4_items = []
    if v4:  # version 4's attention (2 launches: replaces qkv_rope_cache, decode_attention and the compaction)
        sub_o = list_sub("o", cfgs["o"].kr, Dh)
        lo = ((t_o, sub_o, list_buffers(1, H * Dh, sub_o, dev))
              if cfgs["o"].listed and sub_o % Dh == 0 else None)
        for pdl in (False, True):
            v4_items.append((f"v4 attention_fused (+ o lists){' PDL' if pdl else ''}",
                             lambda i, pdl=pdl: dops.attention_fused(p_qkv, None, cos, sin, pos, kc, vc, H, Hkv, 0,
                                                                     lists=lo, pdl=pdl)))
        v4_items.append(("v4 add_rmsnorm (sum down partials, + qkv lists) PDL",
                         lambda i: dops.add_rmsnorm(h, p_down, w, 1e-5, lists=lq, pdl=True)))
    out = []
    for label, fn in items:
        us = _graph_time(fn) * 1e6
        out.append({"kernel": label, "us": us})
        log(f"step kernel {label:48s} {us:6.1f} us")
    total = sum(r["us"] for r in out)
    log(f"step kernels per layer {total:.1f} us (x {c.num_hidden_layers} layers = {total * c.num_hidden_layers / 1e3:.2f}"
        f" ms per token); partials S {S}")
    res["step_breakdown"] = {"model": name, "partials": S, "kernels": out, "per_layer_us": total,
                             "norm_mode": dops.NORM_MODE}
    for label, fn in v3_items:
        us = _graph_time(fn) * 1e6
        res["step_breakdown"]["kernels"].append({"kernel": label, "us": us, "v3_norm": True})
        log(f"step kernel {label:48s} {us:6.1f} us")
    for label, fn in v4_items:  # alone in a graph; with PDL, consecutive launches of the same kernel overlap
        us = _graph_time(fn) * 1e6
        res["step_breakdown"]["kernels"].append({"kernel": label, "us": us, "v4": True})
        log(f"step kernel {label:48s} {us:6.1f} us")


def _file_decode_rows(res: dict, rows: list[dict], dense_best: dict) -> None:
    """Attach the dense reference to a group of decode rows and add them to the results."""
    for r in rows:
        r["dense_tok_s"] = dense_best["tok_s"]
        r["dense_path"] = dense_best["config"]
        r.pop("_tokens", None)
    res["decode"].extend(rows)


def _one_program_norm_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, dense_best: dict) -> None:
    """Side by side with the rows above (same loop, same thresholds, batch 1): the version-3 norm kernel (one
    program per row) in place of the split norm (two launches of many programs), dense (Triton GEMVs) and 0.50."""
    from ..kernels import decode_ops as dops

    split_rows = {r["config"]: r for r in rows}
    default_mode, dops.NORM_MODE = dops.NORM_MODE, "row"
    try:
        for cfg, sparse in (("dense (triton)", False), ("uniform 0.50", True)):
            if sparse and ("uniform", 0.5) not in th:
                continue
            if sparse:
                dec.set_thresholds(th[("uniform", 0.5)])
            dec.backend, dec.sparse = "triton", sparse
            r = _decode_rows(dec, gen, prompt, new_tokens, runs, f"{name} {cfg} one-program norm", log)
            row = {"model": name, "B": 1, "ctx": prompt.shape[1], "config": f"{cfg}, one-program norm (v3)",
                   "nominal": 0.5 if sparse else 0.0, "norm": "one-program", **r}
            ref = split_rows.get(cfg)
            if ref is not None:
                row["split_norm_speedup"] = ref["tok_s"] / r["tok_s"]
                row["tokens_identical_to_split_norm"] = bool(torch.equal(r["_tokens"], ref["_tokens"]))
                row["realised"] = ref.get("realised", {})
            if sparse:
                row["speedup_vs_dense"] = r["tok_s"] / dense_best["tok_s"]
            rows.append(row)
            log(f"    split norm vs one-program: {row.get('split_norm_speedup', float('nan')):.3f}x; tokens identical "
                f"{row.get('tokens_identical_to_split_norm')}")
    finally:
        dops.NORM_MODE = default_mode


def _try_decode_rows(dec, gen, prompt, new_tokens, runs, name, label, log, errors: list) -> dict | None:
    """`_decode_rows`, or None with the error recorded (e.g. PDL refused inside graph capture) so the next row runs."""
    try:
        return _decode_rows(dec, gen, prompt, new_tokens, runs, f"{name} {label}", log)
    except Exception as e:
        log(f"    {label} FAILED: {type(e).__name__}: {e}")
        errors.append({"section": f"decode {name} {label}", "error": f"{type(e).__name__}: {e}"})
        torch.cuda.synchronize()
        return None


def _against(row: dict, ref: dict | None, version: str) -> None:
    """Compare a row with the same configuration's row of another step version (same thresholds, same prompt):
    identical greedy tokens, speed ratio; the realised sparsity is the reference row's (same masks)."""
    row[f"tokens_identical_to_{version}"] = None if ref is None else bool(torch.equal(row["_tokens"], ref["_tokens"]))
    if ref is not None:
        row[f"speedup_vs_{version}"] = row["tok_s"] / ref["tok_s"]
        row["realised"] = ref.get("realised", {})


def _against_fastest_dense(rows: list[dict]) -> None:
    """Sparse rows' speedups against the fastest dense row of the loop (the issue's definition of dense)."""
    dense = max(r["tok_s"] for r in rows if r["nominal"] == 0.0)
    for r in rows:
        if r["nominal"] > 0:
            r["speedup_vs_dense"] = r["tok_s"] / dense


def _v4_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, errors: list, no_pdl: bool = True) -> None:
    """Version-4 step (the library default: fused attention, o lists from the combine, PDL) next to version 3's rows
    of the same run, batch 1: dense (Triton GEMVs) and uniform 0.50, with PDL and (`no_pdl`) without. Each row
    records whether its greedy tokens equal version 3's for the same thresholds (they may differ late: o equals
    version 3's to fp32 rounding). Speedups are against the fastest dense row of the loop, version 4's dense included."""
    v3 = {r["config"]: r for r in rows}
    dec.backend = "triton"
    dec.fused = True
    try:
        for cfg, sparse, pdl in (("dense (triton)", False, True), ("uniform 0.50", True, True),
                                 ("uniform 0.50", True, False)):
            if (sparse and ("uniform", 0.5) not in th) or (not pdl and not no_pdl):
                continue
            if sparse:
                dec.set_thresholds(th[("uniform", 0.5)])
            dec.sparse, dec.pdl = sparse, pdl
            label = f"v4 {cfg}" + ("" if pdl else " no PDL")
            r = _try_decode_rows(dec, gen, prompt, new_tokens, runs, name, label, log, errors)
            if r is None:
                continue
            row = {"model": name, "B": 1, "ctx": prompt.shape[1], "config": label, "nominal": 0.5 if sparse else 0.0,
                   "step": "v4", "pdl": pdl, **r}
            _against(row, v3.get(cfg), "v3")
            rows.append(row)
            log(f"    v4 tokens identical to v3: {row['tokens_identical_to_v3']}; "
                f"vs v3 {row.get('speedup_vs_v3', float('nan')):.3f}x")
        for r in rows:  # version 3's rows keep their ratio to version 3's dense rows too
            if r["nominal"] > 0 and "speedup_vs_dense" in r:
                r.setdefault("speedup_vs_dense_v3_rows", r["speedup_vs_dense"])
        _against_fastest_dense(rows)
    finally:
        dec.fused, dec.pdl = False, True


def bound_gemv(keep: float):
    """The decode loop's bound for any sparse GEMV at keep fraction, as a `Decoder._gemv` replacement (benchmark rows
    only): the dense kernel over only the first keep * K rows of each weight and input, i.e. exactly the bytes a
    sparse GEMV must read, contiguous and known before the input arrives (no survivor lists, no index loads). On a
    GPU its configuration is the tuned dense one with each program's rows scaled by keep (same grid; configurations
    chosen for the smaller matrix gained nothing, run 49). Its values are meaningless, its time is not: the dense
    path's time does not depend on the values. Survivor lists written by the producers are ignored."""
    def gemv(i: int, gname: str, g, x: torch.Tensor, lists=None, pdl: bool = False) -> torch.Tensor:
        K, N = g.wt.shape
        # whole multiples of 16 rows: 6937 rows lost Triton's divisibility specialisation for down (+6 us, run 48)
        rows = min(K, 16 * round(keep * K / 16))
        if x.is_cuda and sg.HAVE_TRITON:
            cfg = kops.get_config(K, N, x.shape[0], True)
            kr = max(8, 8 * round(keep * cfg.kr / 8))
            return launch_sparse_gemv(x[:, :rows], g.wt[:rows], g.t, g.widths, dense=True,
                                      config=replace(cfg, kr=kr, chunk=min(cfg.chunk, kr)), pdl=pdl)
        return torch.ops.wisparse.sparse_gemv(x[:, :rows].contiguous(), g.wt[:rows], g.t[:, :rows].contiguous(),
                                              g.widths, True)
    return gemv


def _bound_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, errors: list) -> None:
    """The loop's ceiling beside version 4's rows (batch 1): the version-4 step with every layer GEMV replaced by
    `bound_gemv` at keep = 1 - the realised sparsity of uniform 0.50, with the dense step's small kernels and with
    the sparse step's (which write survivor lists). What a sparse GEMV without any cost of its own would reach."""
    ref = next((r for r in rows if r["config"] == "uniform 0.50" and isinstance(r.get("realised"), dict)), None)
    if ref is None or ("uniform", 0.5) not in th:
        return
    keep = 1.0 - ref["realised"]["weighted"]
    dec.backend, dec.fused, dec.pdl = "triton", True, True
    dec.set_thresholds(th[("uniform", 0.5)])
    dec._gemv = bound_gemv(keep)  # an instance attribute: the step's calls take it instead of the method
    try:
        for small, sparse in (("plain small kernels", False), ("list-writing small kernels", True)):
            dec.sparse = sparse
            label = f"v4 bound: dense kernel on {keep:.3f} of the rows, {small}"
            r = _try_decode_rows(dec, gen, prompt, new_tokens, runs, name, label, log, errors)
            if r is not None:
                rows.append({"model": name, "B": 1, "ctx": prompt.shape[1], "config": label, "nominal": 0.5,
                             "step": "bound", "keep": keep, **r})
        _against_fastest_dense(rows)
    finally:
        del dec._gemv
        dec.fused = False


def _v5_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, errors: list) -> None:
    """Version 5 (version 4 + the MLP in one persistent launch), batch 1: uniform 0.50, and every channel kept
    through the same listed path (thresholds 0: the kernels at 0%, a dense candidate by the issue's definition).
    Tokens at 0.50 are compared with version 4's (the kernel's arithmetic is the same: they should be identical)."""
    v4 = {r["config"].removeprefix("v4 "): r for r in rows if r.get("step") == "v4"}
    dec.backend, dec.fused, dec.pdl, dec.persistent_mlp = "triton", True, True, True
    try:
        for cfg, level in (("uniform 0.50", 0.5), ("every channel (lists, t=0)", 0.0)):
            if level > 0 and ("uniform", 0.5) not in th:
                continue
            if level > 0:
                dec.set_thresholds(th[("uniform", 0.5)])
            else:
                dec.set_thresholds({(i, g): torch.zeros_like(grp.t) for i, g, grp in dec.groups()})
            dec.sparse = True
            label = f"v5 {cfg}"
            r = _try_decode_rows(dec, gen, prompt, new_tokens, runs, name, label, log, errors)
            if r is None:
                continue
            row = {"model": name, "B": 1, "ctx": prompt.shape[1], "config": label, "nominal": level, "step": "v5", **r}
            _against(row, v4.get(cfg), "v4")
            rows.append(row)
            log(f"    v5 tokens identical to v4: {row['tokens_identical_to_v4']}; "
                f"vs v4 {row.get('speedup_vs_v4', float('nan')):.3f}x")
        _against_fastest_dense(rows)
    finally:
        dec.fused, dec.persistent_mlp = False, False


def _decode_model(res, mi, name, batches, levels, nonuniform, contexts, prompt_len, new_tokens, context_new_tokens,
                  runs, left, log, v4: bool = False, save=None, v4_no_pdl: bool = True,
                  norm_compare: bool = False, v5: bool = True, bound: bool = True) -> None:
    from .calibrate import calibrate, nonuniform_levels, uniform_levels, weighted_mean
    from .generate import GraphGenerator
    from .model import Decoder

    torch.manual_seed(0)
    # version 3 for the main rows (as in runs 1-6); `_v4_rows` adds version 4 (the library default) beside them
    dec = Decoder.random(name, device="cuda", dtype=torch.bfloat16, seed=mi, fused=False, tuned=False)
    gprompt = torch.Generator().manual_seed(0)
    th = {}
    lv_list = [("uniform", lv, uniform_levels(dec, lv)) for lv in levels]
    if nonuniform:
        lv_list.append(("non-uniform", 0.5, nonuniform_levels(dec)))
    for B in batches:
        if left() < 30:
            break
        prompt = torch.randint(0, dec.V, (B, prompt_len), generator=gprompt).cuda()
        gen = GraphGenerator(dec, batch=B, max_len=prompt_len + new_tokens + 64, max_new_tokens=new_tokens)
        rows = []
        dec.sparse = False
        for backend in ("cublas", "triton"):
            dec.backend = backend
            r = _decode_rows(dec, gen, prompt, new_tokens, runs, f"{name} dense {backend}", log)
            rows.append({"model": name, "B": B, "ctx": prompt_len, "config": f"dense ({backend})", "nominal": 0.0, **r})
        dense_best = max(rows, key=lambda r: r["tok_s"])
        dec.backend = "triton"
        try:
            for kind, lv, levels_map in lv_list:
                if left() < 20:
                    break
                key = (kind, lv)
                if key not in th:
                    th[key] = calibrate(dec, levels_map)
                dec.set_thresholds(th[key])
                dec.sparse = True
                r = _decode_rows(dec, gen, prompt, new_tokens, runs, f"{name} {kind} {lv:.2f}", log)
                real = measure_realised(dec, gen, prompt, new_tokens)
                same = bool(torch.equal(real.pop("tokens"), r["_tokens"]))
                rows.append({"model": name, "B": B, "ctx": prompt_len, "config": f"{kind} {lv:.2f}",
                             "nominal": weighted_mean(dec, levels_map), "realised": real,
                             "metered_tokens_identical": same, "speedup_vs_dense": r["tok_s"] / dense_best["tok_s"],
                             **r})
                log(f"    realised {real['weighted']:.3f} (by group "
                    f"{', '.join(f'{k} {v:.3f}' for k, v in real['by_group'].items())}), "
                    f"speedup {rows[-1]['speedup_vs_dense']:.2f}x")
            if norm_compare and B == 1 and left() >= 30:
                _one_program_norm_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, dense_best)
            if v4 and B == 1 and left() >= 30:
                _v4_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, res["errors"], no_pdl=v4_no_pdl)
                if bound and left() >= 30:
                    _bound_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, res["errors"])
                if v5 and left() >= 30:
                    _v5_rows(dec, gen, prompt, new_tokens, runs, name, th, rows, log, res["errors"])
                dense_best = max((r for r in rows if r["nominal"] == 0.0), key=lambda r: r["tok_s"])
        finally:
            dec.fused = False
            _file_decode_rows(res, rows, dense_best)
            if save:
                save()
            del gen
            torch.cuda.empty_cache()
    for ctx in contexts:
        if left() < 40:
            break
        prompt = torch.randint(0, dec.V, (1, ctx), generator=gprompt).cuda()
        gen = GraphGenerator(dec, batch=1, max_len=ctx + context_new_tokens + 64, max_new_tokens=context_new_tokens)
        rows = []
        dec.sparse = False
        for backend in ("cublas", "triton"):
            dec.backend = backend
            r = _decode_rows(dec, gen, prompt, context_new_tokens, runs, f"{name} dense {backend}", log)
            rows.append({"model": name, "B": 1, "ctx": ctx, "config": f"dense ({backend})", "nominal": 0.0, **r})
        dense_best = max(rows, key=lambda r: r["tok_s"])
        dec.backend = "triton"
        if ("uniform", 0.5) not in th:
            th[("uniform", 0.5)] = calibrate(dec, uniform_levels(dec, 0.5))
        dec.set_thresholds(th[("uniform", 0.5)])
        dec.sparse = True
        r = _decode_rows(dec, gen, prompt, context_new_tokens, runs, f"{name} uniform 0.50", log)
        rows.append({"model": name, "B": 1, "ctx": ctx, "config": "uniform 0.50", "nominal": 0.5,
                     "speedup_vs_dense": r["tok_s"] / dense_best["tok_s"], **r})
        _file_decode_rows(res, rows, dense_best)
        if save:
            save()
        del gen
        torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    e = res["env"]
    kc = res.get("kernel_check") or {"cases": 0, "worst_rel_err": float("nan"), "failures": ["not run"]}
    L = [f"# Decode speed on {e['gpu']}", "",
         f"torch {e['torch']}, triton {e['triton']}, {e['date_utc']} UTC. Measured copy bandwidth "
         f"{res.get('copy_tbps', float('nan')):.2f} TB/s (bytes read + written). Kernel check vs float64: "
         f"{kc['cases']} random cases, worst relative error {kc['worst_rel_err']:.1e}, "
         f"{len(kc['failures'])} failures. GEMV CTAs per SM capped under PDL (`sparse_gemv.CAP_CTAS`): "
         f"{e.get('cap_ctas_under_pdl', False)}.", "",
         "Protocol: " + "; ".join(f"{k}: {v}" for k, v in res["protocol"].items()), "",
         "## Decode tokens/s (batch rows; tokens/s per row)", "",
         "| model | B | context | config | nominal | realised | tok/s | x dense | dense tok/s (path) | prefill ms |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("decode", []):
        real = r.get("realised", {}).get("weighted") if isinstance(r.get("realised"), dict) else None
        L.append(f"| {r['model']} | {r['B']} | {r['ctx']} | {r['config']} | {r['nominal']:.3f} | "
                 f"{'' if real is None else f'{real:.3f}'} | {r['tok_s']:.1f} | "
                 f"{r.get('speedup_vs_dense', r['tok_s'] / r['dense_tok_s']):.2f} | {r['dense_tok_s']:.1f} "
                 f"({r.get('dense_path', '')}) | {r['prefill_ms']:.1f} |")
    v4 = [r for r in res.get("decode", []) if r.get("step") == "v4"]
    if v4:
        L += ["", "## Version 4 step (the library default since run 6) next to version 3 (same run, batch 1)", "",
              "Version 4: attention split makes q/k/v (RoPE, cache write), combine writes o's survivor lists, "
              "programmatic dependent launch (PDL) between the step's Triton kernels; 9 launches per layer at 50% "
              "(version 3: 11). Speedups vs dense use the fastest dense row, version 4's included.", "",
              "| model | config | tok/s | x version 3 | x dense | tokens identical to version 3 |", "|---|---|---|---|---|---|"]
        L += [f"| {r['model']} | {r['config']} | {r['tok_s']:.1f} | {r.get('speedup_vs_v3', float('nan')):.3f} | "
              f"{r.get('speedup_vs_dense', r['tok_s'] / r['dense_tok_s']):.2f} | {r.get('tokens_identical_to_v3')} |"
              for r in v4]
    bound = [r for r in res.get("decode", []) if r.get("step") == "bound"]
    if bound:
        L += ["", "## The loop's bound: version 4 with a sparse GEMV that costs nothing of its own (same run, batch 1)",
              "", "Every layer GEMV replaced by the dense kernel over only the first keep = 1 - realised fraction of "
              "its rows (`bench.bound_gemv`): the bytes a sparse GEMV must read, contiguous and known in advance. "
              "'list-writing small kernels': the sparse step's producers still write their survivor lists. The "
              "sparse row's tok/s as a fraction of each bound.", "",
              "| model | config | tok/s | x dense | v4 uniform 0.50 / this |", "|---|---|---|---|---|"]
        v4_sparse = {r["model"]: r for r in v4 if r["config"] == "v4 uniform 0.50"}
        for r in bound:
            ours = v4_sparse.get(r["model"])
            frac = "" if ours is None else f"{ours['tok_s'] / r['tok_s']:.2f}"
            L.append(f"| {r['model']} | {r['config']} | {r['tok_s']:.1f} | "
                     f"{r.get('speedup_vs_dense', r['tok_s'] / r['dense_tok_s']):.2f} | {frac} |")
    v5 = [r for r in res.get("decode", []) if r.get("step") == "v5"]
    if v5:
        L += ["", "## Version 5 step (opt-in): version 4 with the MLP in one persistent launch (same run, batch 1)", "",
              "gate|up list GEMV, SiLU*mul with down's lists, and down list GEMV in one launch whose programs take "
              "work items in order from a ticket counter and hand the h chunks over by arrival counters (no kernel "
              "boundary between them). 'every channel' = thresholds 0 through the same listed kernels (the kernels at "
              "0%), a dense candidate. Speedups vs dense use the fastest dense row, these included.", "",
              "| model | config | realised | tok/s | x version 4 | x dense | tokens identical to version 4 |",
              "|---|---|---|---|---|---|---|"]
        for r in v5:
            real = r.get("realised", {}).get("weighted") if isinstance(r.get("realised"), dict) else None
            L.append(f"| {r['model']} | {r['config']} | {'' if real is None else f'{real:.3f}'} | {r['tok_s']:.1f} | "
                     f"{r.get('speedup_vs_v4', float('nan')):.3f} | "
                     f"{r.get('speedup_vs_dense', r['tok_s'] / r['dense_tok_s']):.2f} | "
                     f"{r.get('tokens_identical_to_v4')} |")
    if res.get("mlp_block"):
        L += ["", "## One layer's MLP (batch 1) inside CUDA graphs: three launches against the persistent kernel", "",
              "| model | sparsity (x and h) | realised x / h | path | us | 3 launches / this |", "|---|---|---|---|---|---|"]
        L += [f"| {r['model']} | {r['sparsity']:.2f} | {r['realised_x']:.3f} / {r['realised_h']:.3f} | {r['path']} | "
              f"{r['us']:.1f} | {r.get('vs_3_launches', 1.0):.3f} |" for r in res["mlp_block"]]
    one = [r for r in res.get("decode", []) if r.get("norm") == "one-program"]
    if one:
        L += ["", "## Split norm (two launches of many programs) against the one-program norm (same run, batch 1)", "",
              "| model | config | tok/s | split norm / this | tokens identical to the split norm's |", "|---|---|---|---|---|"]
        L += [f"| {r['model']} | {r['config']} | {r['tok_s']:.1f} | {r.get('split_norm_speedup', float('nan')):.3f} | "
              f"{r.get('tokens_identical_to_split_norm')} |" for r in one]
    L += ["", "## Kernels inside CUDA graphs (bf16; bytes actually read = surviving weight rows + x + thresholds + "
          "fp32 partials)", "",
          "| matrix [out x in] | B | path | nominal sparsity | realised | us | TB/s | of copy BW | F.linear time / this |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("kernels", []):
        L.append(f"| {r['matrix']} | {r['B']} | {r['path']} | {r['sparsity']:.2f} | {r.get('realised', 0):.3f} | "
                 f"{r['us']:.1f} | {r['tbps']:.2f} | {r.get('copy_fraction', r['tbps'] / res['copy_tbps']):.0%} | "
                 f"{r.get('vs_linear', 1.0):.2f} |")
    if res.get("step_breakdown"):
        sb = res["step_breakdown"]
        L += ["", f"## The decode step's small kernels ({sb['model']}, batch 1, each alone inside a CUDA graph; "
              f"partials S {sb['partials']})", "", "| kernel | us |", "|---|---|"]
        L += [f"| {r['kernel']} | {r['us']:.1f} |" for r in sb["kernels"] if not (r.get("v4") or r.get("v3_norm"))]
        mode = sb.get("norm_mode", "split" if sb.get("split_norm") else "")
        L.append(f"| per layer (version 3 step{f', {mode} norm' if mode else ''}) | "
                 f"{sb['per_layer_us']:.1f} |")
        L += [f"| {r['kernel']} | {r['us']:.1f} |" for r in sb["kernels"] if r.get("v3_norm")]
        L += [f"| {r['kernel']} | {r['us']:.1f} |" for r in sb["kernels"] if r.get("v4")]
    if res.get("errors"):
        L += ["", "## Errors / skipped sections", ""] + [f"- {x['section']}: {x['error']}" for x in res["errors"]]
    src = res.get("protocol", {}).get("configs_from")
    L += ["", "## Launch configurations chosen by the sweep" + (f" of an earlier run, read from {src}" if src else "")
          + " (block_n, kr, block_k, warps, stages, dot, compact, prefetch[, listed, split]); key = K x N x "
          "projections | batch | dense", ""]
    for k, v in res.get("configs", {}).items():
        how = f"{v['us']:.1f} us" if "us" in v else f"{v.get('from', 'given')}, replacing {v.get('replaces')}"
        L.append(f"- {k}: {v['config']} ({how})")
    return "\n".join(L) + "\n"


def main(argv=None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(prog="wisparse bench", description=__doc__)
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


def add_arguments(ap) -> None:
    ap.add_argument("--models", default="llama-3.1-8b,mistral-7b,qwen2.5-7b",
                    help="named shapes, comma-separated (llama-3.1-8b, mistral-7b, qwen2.5-7b)")
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes (first model; others run batch 1)")
    ap.add_argument("--levels", default="0.4,0.5,0.6", help="uniform sparsity levels")
    ap.add_argument("--no-nonuniform", action="store_true", help="skip the non-uniform (0.3..0.7 per block) config")
    ap.add_argument("--contexts", default="1024,4096", help="extra prompt lengths for the context rows (first model)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (after one warm-up); the median is kept")
    ap.add_argument("--no-sweep", action="store_true", help="skip the kernel configuration sweep (use heuristics)")
    ap.add_argument("--configs", default=None, help="JSON of launch configs from an earlier run (skips the sweep)")
    ap.add_argument("--sweep-models", default="", help="extra named shapes whose matrices the sweep also tunes")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop optional rows after this many seconds")
    ap.add_argument("--no-v4", action="store_true",
                    help="skip the version-4 step rows (batch 1: dense and 0.50 with PDL; the first model also "
                         "without PDL)")
    ap.add_argument("--v5", action="store_true",
                    help="add the version-5 rows (version 4 + the MLP in one persistent launch; batch 1; slower than "
                         "version 4 in runs 7-8)")
    ap.add_argument("--no-bound", action="store_true",
                    help="skip the bound rows (version 4 with each layer GEMV replaced by the dense kernel over only "
                         "the surviving fraction of its rows, contiguous: what a cost-free sparse GEMV would reach)")
    ap.add_argument("--mlp-block", action="store_true",
                    help="add the MLP-block table (three launches against the persistent kernel)")
    ap.add_argument("--norm-compare", action="store_true",
                    help="also decode with the one-program norm (batch 1, dense and 0.50) beside the split norm")
    ap.add_argument("--resweep", default="",
                    help="with --configs: shapes (K x N x projections, e.g. 4096x6144x3) whose batch-1 sparse "
                         "configuration is swept again")
    ap.add_argument("--no-kernel-table", action="store_true", help="skip the per-kernel timing table")
    ap.add_argument("--out", default="benchmarks/results/decode_h200", help="output path stem (.json and .md)")


def run_from_args(a) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("wisparse bench needs a CUDA GPU")
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    res = run(models=tuple(a.models.split(",")), batches=ints(a.batches),
              levels=tuple(float(v) for v in a.levels.split(",") if v), nonuniform=not a.no_nonuniform,
              contexts=ints(a.contexts), prompt_len=a.prompt_len, new_tokens=a.new_tokens, runs=a.runs,
              sweep=not a.no_sweep, configs_path=a.configs, budget_s=a.budget_s,
              sweep_models=tuple(v for v in a.sweep_models.split(",") if v), v4=not a.no_v4,
              resweep=tuple(v for v in a.resweep.split(",") if v), kernel_table=not a.no_kernel_table,
              norm_compare=a.norm_compare, v5=a.v5, mlp_block=a.mlp_block, bound=not a.no_bound,
              out_json=a.out + ".json", out_md=a.out + ".md")
    print(markdown(res))
    return res
