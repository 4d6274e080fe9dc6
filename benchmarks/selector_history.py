"""Every alpha selector tried on the H200 perplexity table, side by side with TEAL and WINA, read from the row
caches (no model is run). Writes benchmarks/results/ppl_smollm2_selector_history.md.

    python benchmarks/selector_history.py

Each selector's rows were computed once, on the same evaluation windows and calibration thresholds as the
baselines; its selector was fixed before its rows were seen. '<' marks a level where that selector's wisparse is
no worse than both TEAL and WINA (the issue's criterion), 'x' one where it is worse than either.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (0.25, 0.4, 0.5, 0.6, 0.7)
SELECTORS = {  # label -> (cache file, spec fields that identify it)
    "v1: block, kl, 4 windows, grid 0-1": ("ppl_smollm2_selector_v1.jsonl", {"selection_windows": 4}),
    "v2: block (whole grid), kl, 8 windows": ("ppl_smollm2_cache.jsonl", {"selector": 2}),
    "v3: validated, nll, 16 windows": ("ppl_smollm2_cache.jsonl", {"selector": 3}),
    "v4: global, kl, 16 windows": ("ppl_smollm2_cache.jsonl", {"selector": 4, "alpha_search": "global"}),
    "v4: block (grid neighbours), kl, 16 windows": ("ppl_smollm2_cache.jsonl",
                                                    {"selector": 4, "alpha_search": "block", "alpha_min_z": None,
                                                     "selection_windows": 16}),
    "v5: v4 + min_z 2": ("ppl_smollm2_cache.jsonl",
                         {"selector": 4, "alpha_search": "block", "alpha_min_z": 2.0, "selection_windows": 16}),
    "v6: v4 with 48 selection windows (main table)": ("ppl_smollm2_cache.jsonl",
                                         {"selector": 4, "alpha_search": "block", "alpha_min_z": None,
                                          "selection_windows": 48}),
}


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]


def result_of(entries: list[dict], method: str, mode: str, level: float, match: dict, key: str = "ppl") -> float | None:
    """`key` of the first row of this method, mode and level whose spec has the `match` fields (None: no such row,
    or the row lacks `key`)."""
    for entry in entries:
        spec = entry["spec"]
        if (spec["method"], spec["mode"], spec["sparsity"]) == (method, mode, level) and all(
                spec.get(k) == v for k, v in match.items()) and entry["result"].get(key) is not None:
            return entry["result"][key]
    return None


def dev_section(cache: list[dict]) -> list[str]:
    """The pre-registered choice between candidates scored on WikiText-2 validation (`dev_ppl`): the lower mean log
    dev perplexity over the 8 points from 0.40 up wins; test perplexity plays no part."""
    lines = ["## Development perplexity (WikiText-2 validation, 16 x 2048 tokens): the pre-registered choice", "",
             "| selector | " + " | ".join(f"{m} {lv:.2f}" for m in ("threshold", "topk") for lv in LEVELS[1:])
             + " | mean log (0.40 up) |", "|" + "---|" * (2 + 2 * len(LEVELS[1:]))]
    for label, (name, match) in SELECTORS.items():
        devs = []
        for mode in ("threshold", "topk"):
            for level in LEVELS[1:]:
                devs.append(result_of(cache, "wisparse", mode, level, match, key="dev_ppl"))
        if name != "ppl_smollm2_cache.jsonl" or any(d is None for d in devs):
            continue
        mean_log = sum(math.log(d) for d in devs) / len(devs)
        lines.append(f"| {label} | " + " | ".join(f"{d:.2f}" for d in devs) + f" | {mean_log:.4f} |")
    return lines + [""]


def main() -> None:
    main_cache = load("ppl_smollm2_cache.jsonl")
    lines = ["# Alpha selectors tried on the H200 table (SmolLM2-135M-Instruct, fp32, 32 x 2048 test tokens)", "",
             " ".join(__doc__.split("\n\n")[2].split()), ""]
    for mode in ("threshold", "topk"):
        header = ["level", "teal", "wina", *SELECTORS]
        lines += [f"## {mode} mode", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        wins = dict.fromkeys(SELECTORS, 0)
        counted = dict.fromkeys(SELECTORS, 0)
        for level in LEVELS:
            teal = result_of(main_cache, "teal", mode, level, {})
            wina = result_of(main_cache, "wina", mode, level, {})
            cells = [f"{level:.2f}", f"{teal:.3f}", f"{wina:.3f}"]
            for label, (cache, match) in SELECTORS.items():
                ppl = result_of(load(cache), "wisparse", mode, level, match)
                if ppl is None:
                    cells.append("not run")
                    continue
                ok = ppl <= min(teal, wina)
                if level >= 0.4:
                    counted[label] += 1
                    wins[label] += ok
                cells.append(f"{ppl:.3f} {'<' if ok else 'x'}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Levels 0.40-0.70 where wisparse is no worse than both: " + "; ".join(
            f"{label.split(', kl')[0].split(', nll')[0]} {wins[label]}/{counted[label]}" for label in SELECTORS), ""]
    lines += dev_section(main_cache)
    out = RESULTS / "ppl_smollm2_selector_history.md"
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
