"""Result rows -> Markdown tables (and a plot) a researcher can paste into a paper."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("method", "mode", "allocation", "sparsity_nominal", "sparsity_realised", "ppl")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path_stem: str | Path, protocol: dict, rows: list[dict], title: str) -> tuple[Path, Path]:
    """`<stem>.json` (protocol + rows) and `<stem>.md` (protocol list + table)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1, default=str))
    columns = COLUMNS + tuple(c for c in ("dev_ppl", "sparsity_model_cats", "by_site", "alpha", "eval_windows",
                                          "calib_tokens", "calib_seconds") if any(c in r for r in rows))
    protocol_lines = "\n".join(f"- **{k}**: {v}" for k, v in protocol.items())
    md_path.write_text(f"# {title}\n\n{protocol_lines}\n\n{markdown_table(rows, columns)}\n")
    return json_path, md_path


def plot_ppl_vs_sparsity(rows: list[dict], path: str | Path, dense_ppl: float | None = None) -> Path:
    """Perplexity against realised model-level sparsity, one line per (method, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["method"] in ("dense", "cats"):
            continue
        groups.setdefault((row["method"], row["mode"]), []).append(row)
    for (method, mode), group in sorted(groups.items()):
        group.sort(key=lambda r: r["sparsity_realised"])
        ax.plot([r["sparsity_realised"] for r in group], [r["ppl"] for r in group], marker="o",
                linestyle="-" if mode == "threshold" else "--", label=f"{method} ({mode})")
    if dense_ppl:
        ax.axhline(dense_ppl, color="grey", linewidth=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("realised sparsity (parameter-weighted, evaluation tokens)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)
