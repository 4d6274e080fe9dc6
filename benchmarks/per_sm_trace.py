"""Per-SM view of a timeline run's per-program GEMV records (`timeline_h200.py --trace`, `trace_raw`): for each
sparse GEMV kind, the programs per SM, the SMs' end times, their rows walked per us, and the median end of the
programs by launch rank on their SM (0 = the oldest). Offline, on the CPU machine.

    python benchmarks/per_sm_trace.py benchmarks/results/run28/timeline.json
"""
from __future__ import annotations

import collections
import json
import statistics as st
import sys


def per_sm(records: list[list]) -> dict:
    """records: [pid_n, pid_s, entry, wait, count, end, sm, rows] per program (us from the first post-wait program)."""
    grid_n = max(r[0] for r in records) + 1
    by_sm = collections.defaultdict(list)
    for pid_n, pid_s, _, _, _, end, sm, rows in records:
        by_sm[sm].append((pid_s * grid_n + pid_n, end, rows))  # launch order: pid_n fastest
    ends = [max(p[1] for p in v) for v in by_sm.values()]
    rates = [sum(p[2] for p in v) / max(p[1] for p in v) for v in by_sm.values()]
    rank_ends = collections.defaultdict(list)
    for v in by_sm.values():
        for rank, p in enumerate(sorted(v)):
            rank_ends[rank].append(p[1])
    return {"sms": len(by_sm), "programs_per_sm": dict(sorted(collections.Counter(map(len, by_sm.values())).items())),
            "sm_end_us": (min(ends), st.median(ends), max(ends)),
            "rows_per_us_per_sm": (min(rates), st.median(rates), max(rates)),
            "end_by_rank_us": [st.median(rank_ends[r]) for r in sorted(rank_ends)]}


def main(path: str) -> None:
    rows = json.load(open(path))["rows"]
    for label, row in rows.items():
        for gemv, records in (row.get("trace_raw") or {}).items():
            if gemv.startswith("dense K4096 N128256"):
                continue  # the lm_head
            s = per_sm(records)
            lo, med, hi = s["sm_end_us"]
            print(f"{label[:70]:70s} {gemv:32s} SMs {s['sms']:3d} programs/SM {s['programs_per_sm']} "
                  f"SM end {lo:.1f}/{med:.1f}/{hi:.1f} us, rows/us/SM {s['rows_per_us_per_sm'][1]:.0f}, "
                  f"end by rank {' '.join(f'{x:.1f}' for x in s['end_by_rank_us'])}")


if __name__ == "__main__":
    main(sys.argv[1])
