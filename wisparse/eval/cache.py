"""A JSON-lines cache of finished results, keyed by everything that determines them, so long tables resume."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def cache_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ResultCache:
    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["result"]

    def get(self, spec: dict) -> dict | None:
        return self.entries.get(cache_key(spec))

    def put(self, spec: dict, result: dict) -> None:
        key = cache_key(spec)
        self.entries[key] = result
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "spec": spec, "result": result}, default=str) + "\n")
