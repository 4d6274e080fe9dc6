"""Where a decode step's time goes inside the real loop: a kernel timeline of CUDA-graph replays (H200).

`python benchmarks/timeline_h200.py --out DIR` builds the Llama-3.1-8B shape (random weights, bf16), installs the
launch configurations of an earlier benchmark run, and for the dense and the uniform-0.50 step (version 4 by
default) records a few graph replays with `torch.profiler` (CUPTI reports each kernel of a replayed graph). Per
kernel it gives its duration and its *increment*: end minus the previous kernel's end, i.e. what the kernel adds
to the step's critical path when kernels run one after another (with PDL a kernel starts before its predecessor
ends, so start-to-end durations overlap and do not add up; increments do). Written: timeline.json (every kernel of
one replay) and timeline.md (per kernel kind: count per token, mean duration, mean increment, increment per token).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from wisparse.engine.bench import (_shape_dims, bound_gemv, config_from_spec, engine_shapes,  # noqa: E402
                                   install_configs, time_decode)
from wisparse.engine.calibrate import calibrate, uniform_levels  # noqa: E402
from wisparse.engine.generate import GraphGenerator  # noqa: E402
from wisparse.engine import model as model_mod  # noqa: E402
from wisparse.engine.model import Decoder  # noqa: E402
from wisparse.kernels import decode_ops as dops  # noqa: E402
from wisparse.kernels import ops as kops  # noqa: E402
from wisparse.kernels import sparse_gemv as sg  # noqa: E402

GEMV_NAMES = ("_gemv_list_kernel", "_sparse_gemv_kernel", "_fused_mlp")


def _kernels_of_replays(gen, replays: int, trace_path: str) -> list[list[dict]]:
    """Kernel events (name, grid, start/end in us) of each of `replays` graph replays, in start order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            gen.replay()
            torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    ks = sorted(({"name": e["name"], "grid": tuple(e.get("args", {}).get("grid", ())), "start": float(e["ts"]),
                  "end": float(e["ts"]) + float(e["dur"])} for e in ev if e.get("cat") == "kernel"),
                key=lambda k: k["start"])
    # replays are separated by a host synchronisation: split at the largest gaps
    gaps = sorted(range(1, len(ks)), key=lambda i: ks[i]["start"] - ks[i - 1]["end"], reverse=True)[:replays - 1]
    cuts = [0] + sorted(gaps) + [len(ks)]
    return [ks[a:b] for a, b in zip(cuts, cuts[1:])]


def _label(k: dict) -> str:
    """Kernel kind: GEMVs by name and grid (the grid tells the group apart), the rest by name."""
    name = k["name"]
    short = next((g for g in GEMV_NAMES if g in name), None)
    if short is not None:
        return f"{short} grid {k['grid']}"
    return name[:60]


def summarise(replay: list[dict], n_layers: int) -> dict:
    rows = {}
    prev_end = replay[0]["start"]
    out = []
    for k in replay:
        inc = k["end"] - prev_end
        lab = _label(k)
        r = rows.setdefault(lab, {"kernel": lab, "count": 0, "dur": [], "inc": [], "gap": []})
        r["count"] += 1
        r["dur"].append(k["end"] - k["start"])
        r["inc"].append(inc)
        r["gap"].append(k["start"] - prev_end)
        out.append({**k, "inc": inc, "label": lab})
        prev_end = max(prev_end, k["end"])
    table = []
    for r in rows.values():
        table.append({"kernel": r["kernel"], "per_token": r["count"], "mean_dur_us": statistics.mean(r["dur"]),
                      "mean_inc_us": statistics.mean(r["inc"]), "mean_gap_us": statistics.mean(r["gap"]),
                      "inc_per_token_us": sum(r["inc"])})
    table.sort(key=lambda r: -r["inc_per_token_us"])
    step = replay[-1]["end"] - replay[0]["start"]
    return {"step_us": step, "kernels_per_token": len(replay), "table": table, "replay": out,
            "per_layer_us": step / n_layers}


def traced_step(gen, prompt) -> tuple[torch.Tensor, list[dict]]:
    """One decode step's per-program GEMV records (`sparse_gemv.TRACE`): capture a graph with tracing compiled in,
    replay it (the records of the last replay stay), and return the records and the capture's launch log."""
    tr = {"buf": torch.zeros(16_000_000, dtype=torch.int64, device="cuda"), "next": 0, "log": []}
    sg.TRACE = tr
    try:
        gen.graph = None
        gen.prefill(prompt)
        gen.capture()  # two eager warm-up steps, then the captured one: the last third of the log is the graph's
    finally:
        sg.TRACE = None
    log = tr["log"][-len(tr["log"]) // 3:]
    tr["buf"].zero_()
    gen.prefill(prompt)
    gen.decode(16)
    torch.cuda.synchronize()
    buf = tr["buf"].cpu()
    gen.graph = None  # the next variant captures without tracing
    return buf, log


def trace_summary(buf: torch.Tensor, log: list[dict], read_tb_s: float = 4.45) -> list[dict]:
    """Per GEMV kind (kind and grid), means over its launches in the step (us): when its programs got past the PDL
    wait (relative to the first one, T0 ~ the predecessor's completion), how long the list counts took, the loop,
    when programs finished (median / last), the tail (last - median), and the ideal time of the bytes walked."""
    rows = {}
    for e in log:
        P = e["grid"][0] * e["grid"][1]
        r = buf[e["offset"]: e["offset"] + P * sg.TRACE_FIELDS].view(P, sg.TRACE_FIELDS).double()
        t0, t1, t2, t3, sm, work = r.unbind(1)
        T0 = t1.min()
        rel1, rel3 = (t1 - T0) / 1e3, (t3 - T0) / 1e3
        per_sm = torch.bincount(sm.long(), minlength=1)
        m = {"entered_before_T0": (t0 < T0).double().mean().item(),
             "wait_release_med": rel1.median().item(), "wait_release_max": rel1.max().item(),
             "count_med": ((t2 - t1) / 1e3).median().item(), "loop_med": ((t3 - t2) / 1e3).median().item(),
             "end_med": rel3.median().item(), "end_max": rel3.max().item(),
             "tail": ((t3.max() - t3.median()) / 1e3).item(),
             "work_max_over_mean": (work.max() / work.mean().clamp(min=1)).item(),
             "programs_per_sm_max": per_sm.max().item(), "sms_used": (per_sm > 0).sum().item(),
             "ideal_us": (work.sum() * e["BN"] * 2 / (read_tb_s * 1e6)).item()}
        key = f"{e['kind']} K{e['K']} N{e['N']} grid {tuple(e['grid'])}"
        rows.setdefault(key, []).append(m)
    out = []
    for key, ms in rows.items():
        out.append({"gemv": key, "launches": len(ms),
                    **{k: statistics.mean(m[k] for m in ms) for k in ms[0]}})
    return out


def trace_raw(buf: torch.Tensor, log: list[dict]) -> dict:
    """The first launch of each GEMV kind, per program: [n, s, entry, past the wait, counts, loop end (us from the
    first program past the wait), SM, rows walked]."""
    out = {}
    for e in log:
        key = f"{e['kind']} K{e['K']} N{e['N']} grid {tuple(e['grid'])}"
        if key in out:
            continue
        P = e["grid"][0] * e["grid"][1]
        r = buf[e["offset"]: e["offset"] + P * sg.TRACE_FIELDS].view(P, sg.TRACE_FIELDS).double()
        T0 = r[:, 1].min()
        pid = torch.arange(P)
        out[key] = [[int(pid[i] % e["grid"][0]), int(pid[i] // e["grid"][0]),
                     *[round((r[i, j] - T0).item() / 1e3, 3) for j in range(4)], int(r[i, 4]), int(r[i, 5])]
                    for i in range(P)]
    return out


def print_trace(rows: list[dict]) -> None:
    print(f"  {'GEMV (per-program trace, means over launches, us from the first post-wait program)':86s} "
          "in<T0 rel_med rel_max count  loop end_med end_max  tail imbal ideal  sm/max")
    for r in rows:
        print(f"  {r['gemv'][:86]:86s} {r['entered_before_T0']:5.2f} {r['wait_release_med']:7.2f} "
              f"{r['wait_release_max']:7.2f} {r['count_med']:5.2f} {r['loop_med']:5.2f} {r['end_med']:7.2f} "
              f"{r['end_max']:7.2f} {r['tail']:5.2f} {r['work_max_over_mean']:5.2f} {r['ideal_us']:5.2f} "
              f"{r['sms_used']:3.0f}/{r['programs_per_sm_max']:.0f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--configs", default="benchmarks/results/decode_h200.json",
                    help="launch configurations (a benchmark JSON), or 'none' for the library's own")
    ap.add_argument("--level", type=float, default=0.5)
    ap.add_argument("--replays", type=int, default=4)
    ap.add_argument("--v3", action="store_true", help="version 3 step instead of version 4")
    ap.add_argument("--sublists", default="",
                    help="more sparse variants: sub-lists per segment by group, e.g. 'qkv=2,gu=2;qkv=4,gu=4'")
    ap.add_argument("--whole-lists", action="store_true",
                    help="also the sparse step with whole-segment survivor lists (one producer program per segment)")
    ap.add_argument("--norm-modes", default="",
                    help="more variants, dense and sparse: the norm kernel in these modes, e.g. 'sync'")
    ap.add_argument("--cfg", action="append", default=[],
                    help="a variant with batch-1 GEMV configurations replaced: "
                         "'o=BLOCK_N,KR,BLOCK_K,WARPS,STAGES,SPLIT' (sparse list GEMV), 'd.o=...' (dense GEMV: a dense "
                         "row), 'sub.o=R' (sub-lists), "
                         "'sumsq=N' (the norm's first-launch block), 'nocap' (without sparse_gemv.CAP_CTAS), 'dense' "
                         "(a dense row), 'oracle=KEEP' (an oracle row, see --oracle, with this spec's 'd.' "
                         "configurations); "
                         "several joined by ';'")
    ap.add_argument("--oracle", default="",
                    help="more rows, e.g. '0.484,0.5': each layer GEMV replaced by the dense kernel over a contiguous "
                         "keep fraction of its rows (`bench.bound_gemv`), with the dense row's other kernels and "
                         "with the sparse row's (list-writing) ones")
    ap.add_argument("--trace", action="store_true",
                    help="also per-program GEMV timestamps (globaltimer) of one traced step per variant")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    dims = _shape_dims(a.model)
    shapes = {f"{K}x{sum(w)}x{len(w)}": (K, w) for K, w in dims.values()}  # the model's own GEMV shapes
    if a.configs != "none":  # "none": the library's own choice (the shipped table of this GPU, else the heuristic)
        with open(a.configs) as f:
            best = json.load(f)["configs"]
        install_configs(best, shapes)
    dec = Decoder.random(a.model, device="cuda", dtype=torch.bfloat16, seed=0, fused=not a.v3)
    prompt = torch.randint(0, dec.V, (1, 128), generator=torch.Generator().manual_seed(0)).cuda()
    gen = GraphGenerator(dec, batch=1, max_len=128 + 256 + 64, max_new_tokens=256)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": a.model, "configs": a.configs,
           "step": "v3" if a.v3 else "v4", "rows": {}}
    default_sub = dict(model_mod.LIST_SUBLISTS)
    default_norm = dops.NORM_MODE
    whole = {g: 1 for g in model_mod.LIST_SUBLISTS}  # one sub-list per segment: whole-segment lists
    # (label, sparse, sub-lists, norm mode, {(group, dense): GEMV configuration}, norm sum-of-squares block)
    variants = [("dense", False, None, None, {}, None), (f"uniform {a.level:.2f}", True, None, None, {}, None)]
    if a.whole_lists:
        variants.append((f"uniform {a.level:.2f}, whole-segment lists", True, whole, None, {}, None))
    for spec in filter(None, a.sublists.split(";")):  # e.g. "qkv=2,gu=2,down=4,o=4"
        sub = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
        variants.append((f"uniform {a.level:.2f}, sub-lists {spec}", True, {**default_sub, **sub}, None, {}, None))
    for mode in filter(None, a.norm_modes.split(",")):
        variants += [(f"dense, {mode} norm", False, None, mode, {}, None),
                     (f"uniform {a.level:.2f}, {mode} norm", True, None, mode, {}, None)]
    group_shape = engine_shapes(dec)
    uncapped = set()  # labels of the variants run without the CTA cap
    oracles = {}  # label of an oracle row -> its keep fraction
    for spec in a.cfg:  # e.g. "o=64,512,32,4,8,1;qkv=128,512,64,4,5,1;sub.qkv=4", "d.down=64,2048,64,4,4,1"
        over, sub, sumsq, dense, dense_row, nocap, oracle_keep = {}, {}, None, False, False, False, None
        for part in spec.split(";"):
            if part == "dense":  # a dense row with only the other settings of this spec (e.g. sumsq)
                dense_row = True
                continue
            if part.startswith("oracle="):  # an oracle row (`bench.bound_gemv`) with this spec's dense configurations
                oracle_keep = float(part[7:])
                continue
            if part == "nocap":  # the GEMVs without the PDL placement cap (sparse_gemv.CAP_CTAS)
                nocap = True
                continue
            g, v = part.split("=")
            if g.startswith("sub."):  # sub-lists per segment for this group
                sub[g[4:]] = int(v)
                continue
            if g == "sumsq":  # channels per program of the norm's first launch
                sumsq = int(v)
                continue
            dense = g.startswith("d.")  # a dense GEMV configuration: a dense row
            over[(g[2:] if dense else g, dense)] = config_from_spec(v, dense)
        sparse = not dense_row and (not over or any(not d for _, d in over))
        kind = f"oracle keep {oracle_keep:.3f}, {'sparse' if sparse else 'dense'} small kernels" if oracle_keep \
            else f"uniform {a.level:.2f}" if sparse else "dense"
        variants.append((f"{kind}, config {spec}", sparse, {**default_sub, **sub}, None, over, sumsq))
        if oracle_keep:
            oracles[variants[-1][0]] = oracle_keep
        if nocap:
            uncapped.add(variants[-1][0])
    for keep in filter(None, a.oracle.split(",")):
        for sparse in (False, True):
            label = f"oracle keep {float(keep):.3f}, {'sparse' if sparse else 'dense'} small kernels"
            variants.append((label, sparse, None, None, {}, None))
            oracles[label] = float(keep)
    th = None
    first_logits = {}
    default_sumsq = dops.SUMSQ_BLOCK
    for label, sparse, sub, norm, over, sumsq in variants:
        if sparse and th is None:
            th = calibrate(dec, uniform_levels(dec, a.level))
            dec.set_thresholds(th)
        dec.sparse = sparse
        model_mod.LIST_SUBLISTS.update(sub or default_sub)
        dops.NORM_MODE = norm or default_norm
        dops.SUMSQ_BLOCK = sumsq or default_sumsq
        sg.CAP_CTAS = label not in uncapped
        saved = {}
        for (g, dense), cfg in over.items():
            K, widths = group_shape[g]
            saved[(g, dense)] = kops.get_config(K, sum(widths), 1, dense)
            kops.set_config(K, sum(widths), 1, dense, cfg)
        if label in oracles:
            dec._gemv = bound_gemv(oracles[label])
        gen.graph = None
        speed = time_decode(gen, prompt, 256, 2)
        toks = speed.pop("tokens")
        gen.prefill(prompt)
        gen.replay()  # the first decode step's logits, against the first row of the same sparsity (rounding only)
        first = gen.logits.float().clone()
        ref = first_logits.setdefault(sparse, first) if label not in oracles else first
        rel = ((first - ref).norm() / ref.norm()).item()
        gen.prefill(prompt)
        gen.decode(16)  # position ~144: the attention reads a context like the benchmark's middle
        tag = label.replace(" ", "_").replace(",", "")
        reps = _kernels_of_replays(gen, a.replays, os.path.join(a.out, f"trace_{tag}.json"))
        sums = [summarise(r, len(dec.layers)) for r in reps[1:]]  # the first replay warms the profiler
        best_i = min(range(len(sums)), key=lambda i: sums[i]["step_us"])
        s = sums[best_i]
        s["step_us_all"] = [x["step_us"] for x in sums]
        s["decode_tok_s_unprofiled"] = speed["tok_s"]
        s["decode_runs_tok_s"] = speed["runs_tok_s"]
        s["tokens_head"] = toks[0, :8].tolist()
        s["first_logits_rel_err_vs_first_row"] = rel
        s["sublists_per_segment"] = dict(model_mod.LIST_SUBLISTS) if sparse else None
        s["norm_mode"] = dops.NORM_MODE
        s["sumsq_block"] = dops.SUMSQ_BLOCK
        s["cap_ctas"] = sg.CAP_CTAS
        s["configs"] = {g: list(map(str, (c.block_n, c.kr, c.block_k, c.num_warps, c.num_stages, c.split)))
                        for g, c in ((g, kops.get_config(group_shape[g][0], sum(group_shape[g][1]), 1, not sparse))
                                     for g in group_shape)}
        if a.trace and label not in oracles:  # before the configurations are restored
            buf, log = traced_step(gen, prompt)
            s["trace"] = trace_summary(buf, log)
            s["trace_raw"] = trace_raw(buf, log)
        for (g, dense), cfg in saved.items():
            K, widths = group_shape[g]
            kops.set_config(K, sum(widths), 1, dense, cfg)
        if label in oracles:
            del dec._gemv  # back to the class's method
            s["oracle_keep"] = oracles[label]
        res["rows"][label] = s
        print(f"{label}: {speed['tok_s']:.1f} tok/s unprofiled ({1e6 / speed['tok_s']:.0f} us/token); profiled "
              f"steps {', '.join(f'{x:.0f}' for x in s['step_us_all'])} us; {s['kernels_per_token']} kernels; "
              f"tokens {s['tokens_head']}; first logits vs the first row {rel:.1e}")
        for r in s["table"][:14]:
            print(f"  {r['kernel'][:70]:70s} x{r['per_token']:3d} dur {r['mean_dur_us']:6.2f} inc "
                  f"{r['mean_inc_us']:6.2f} gap {r['mean_gap_us']:6.2f} -> {r['inc_per_token_us']:7.1f} us/token")
        if a.trace:
            print_trace(s["trace"])
    model_mod.LIST_SUBLISTS.update(default_sub)
    dops.NORM_MODE = default_norm
    dops.SUMSQ_BLOCK = default_sumsq
    sg.CAP_CTAS = True
    dense_tok_s = res["rows"]["dense"]["decode_tok_s_unprofiled"]
    for label, s in res["rows"].items():
        s["speedup_vs_dense"] = s["decode_tok_s_unprofiled"] / dense_tok_s
        print(f"{label}: {s['decode_tok_s_unprofiled']:.1f} tok/s, {s['speedup_vs_dense']:.3f}x of this run's dense")
    res["elapsed_s"] = time.time() - t0
    with open(os.path.join(a.out, "timeline.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(a.out, "timeline.md"), "w") as f:
        f.write(markdown(res))


def markdown(res: dict) -> str:
    L = [f"# Decode-step timeline on {res['gpu']} ({res['model']}, {res['step']}, batch 1, torch {res['torch']})",
         "", "Kernel timestamps from CUPTI (torch.profiler) over graph replays; the fastest replay shown. "
         "inc = end minus the previous kernel's end (the kernel's share of the critical path).", ""]
    for label, s in res["rows"].items():
        L += [f"## {label}: profiled step {s['step_us']:.0f} us ({s['per_layer_us']:.1f} us per layer), unprofiled "
              f"{1e6 / s['decode_tok_s_unprofiled']:.0f} us ({s['decode_tok_s_unprofiled']:.1f} tok/s, "
              f"{s.get('speedup_vs_dense', float('nan')):.3f}x of dense)" + (
                  f"; sub-lists per list segment {s['sublists_per_segment']}" if s.get("sublists_per_segment")
                  else ""), "",
              "| kernel | per token | mean duration us | mean increment us | mean gap us | increment per token us |",
              "|---|---|---|---|---|---|"]
        for r in s["table"]:
            L.append(f"| {r['kernel']} | {r['per_token']} | {r['mean_dur_us']:.2f} | {r['mean_inc_us']:.2f} | "
                     f"{r['mean_gap_us']:.2f} | {r['inc_per_token_us']:.1f} |")
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
