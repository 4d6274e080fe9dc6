#!/bin/bash
# One call of the device tool on an nvidia-h200 (`run` with command `bash benchmarks/run_h200.sh`, timeout 600):
# the GPU tests, then the decode benchmark; everything lands in $OUT. About 7-7.5 minutes of device time
# (run 2: tests 102 s, benchmark 206 s; version 3 adds listed-mode candidates to the sweep and rows to the kernel
# table, ~+60 s; the opt-in version-4 step adds 8 GPU tests, ~+25 s, and 3 decode rows + 3 step-breakdown rows,
# ~+40 s with their Triton compiles). Worst case TEST_TIMEOUT + BENCH_TIMEOUT = 560 s < the tool's 600 s (startup and nvidia-smi need the rest);
# BENCH_BUDGET caps the optional rows (360: the context rows still start after the version-4 rows).
# Afterwards copy decode_h200.json, decode_h200.md, bench.log, pytest_gpu.log and gpu_report.txt from the
# returned files into benchmarks/results/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TEST_TIMEOUT:-170}" python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_engine.py > "$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"
timeout "${BENCH_TIMEOUT:-390}" python benchmarks/decode_h200.py --budget-s "${BENCH_BUDGET:-360}" --runs 2 \
    --out "$OUT/decode_h200" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v "^  " "$OUT/bench.log" | tail -60
