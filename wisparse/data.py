"""Text datasets by name, split into three disjoint roles, and cut into token windows.

Roles: `calibration` (thresholds, statistics) and `selection` (alpha and, later, allocation choices) both come
from WikiText-2 *train* paragraphs, split apart; `evaluation` is WikiText-2 *test*. Nothing chosen from data ever
sees evaluation text. `development` (WikiText-2 validation, tokenised) is for choosing between protocols, e.g.
which alpha selector a benchmark uses, without looking at test perplexity. Files are read from a data directory (argument, else $WISPARSE_DATA_DIR), else from the
Hugging Face hub; if both fail the error says what was tried.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from wisparse.errors import WisparseError
from wisparse.hub import hub_reachable

DATA_DIR_ENV = "WISPARSE_DATA_DIR"
SELECTION_FRACTION = 0.2  # the last 20% of the train paragraphs are selection text, the rest calibration


def _read_wikitext_train(path: Path) -> list[str]:
    return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def _read_wikitext_lines(path: Path) -> list[str]:
    # Rows exactly as load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"] (see SOURCES.md).
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def _read_c4(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    local_file: str
    read_local: Callable[[Path], list[str]]
    hub: tuple[str, str | None, str]  # (path, config name, split) for datasets.load_dataset
    joiner: str


DATASETS = {
    "wikitext2-train": DatasetSpec("wikitext2-train", "wikitext-2/wiki.train.raw.first4444paras.txt",
                                   _read_wikitext_train, ("wikitext", "wikitext-2-raw-v1", "train"), "\n\n"),
    "wikitext2-test": DatasetSpec("wikitext2-test", "wikitext-2/wiki.test.raw", _read_wikitext_lines,
                                  ("wikitext", "wikitext-2-raw-v1", "test"), "\n\n"),
    # the tokenised validation split (<unk>, " @-@ "): not the test text's format, but the same corpus, for
    # choosing a protocol's settings (e.g. which alpha selector) without looking at test perplexity
    "wikitext2-valid": DatasetSpec("wikitext2-valid", "wikitext-2/wiki.valid.tokens", _read_wikitext_lines,
                                   ("wikitext", "wikitext-2-v1", "validation"), "\n\n"),
    "c4": DatasetSpec("c4", "c4/c4_validation_2k.jsonl.gz", _read_c4, ("allenai/c4", "en", "validation"), "\n\n"),
}
ROLES = {"calibration": "wikitext2-train", "selection": "wikitext2-train", "evaluation": "wikitext2-test",
         "development": "wikitext2-valid"}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def load_rows(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The rows (documents or paragraphs) of a named dataset."""
    if name not in DATASETS:
        raise WisparseError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = resolve_data_dir(data_dir)
    tried = []
    if root is not None:
        path = root / spec.local_file
        if path.exists():
            return spec.read_local(path)
        tried.append(f"{path} (missing)")
    else:
        tried.append(f"no data directory (--data-dir or ${DATA_DIR_ENV})")
    if not hub_reachable():
        tried.append("the Hugging Face hub (unreachable or HF_HUB_OFFLINE)")
        raise WisparseError(f"dataset {name!r} not found; tried: " + "; ".join(tried))
    try:
        import datasets

        hub_path, config, split = spec.hub
        rows = datasets.load_dataset(hub_path, config, split=split)["text"]
        return [r for r in rows if r.strip()] if name == "wikitext2-train" else list(rows)
    except Exception as err:  # any hub failure: offline, missing package, renamed dataset
        tried.append(f"the Hugging Face hub ({type(err).__name__})")
    raise WisparseError(f"dataset {name!r} not found; tried: " + "; ".join(tried))


def role_rows(role: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of one role; calibration and selection are disjoint slices of the train paragraphs."""
    if role not in ROLES:
        raise WisparseError(f"unknown data role {role!r}; choose one of {', '.join(ROLES)}")
    rows = load_rows(ROLES[role], data_dir)
    if role in ("evaluation", "development"):
        return rows
    split = int(len(rows) * (1 - SELECTION_FRACTION))
    return rows[:split] if role == "calibration" else rows[split:]


def role_text(role: str, data_dir: str | os.PathLike | None = None) -> str:
    rows = role_rows(role, data_dir)
    return DATASETS[ROLES[role]].joiner.join(rows)


def token_windows(
    text: str, tokenizer, window_len: int, max_windows: int | None = None, bos_token_id: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows [n, window_len] (+1 column when a BOS is prepended) from the start of `text`."""
    if window_len < 2:
        raise WisparseError(f"window length must be at least 2, got {window_len}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = len(ids) // window_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise WisparseError(f"text of {len(ids)} tokens is shorter than one window of {window_len}")
    windows = ids[: n * window_len].reshape(n, window_len)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    return windows


def role_windows(
    role: str, tokenizer, window_len: int, max_windows: int | None, data_dir=None, bos_token_id: int | None = None
) -> torch.Tensor:
    return token_windows(role_text(role, data_dir), tokenizer, window_len, max_windows, bos_token_id)
