#!/bin/bash
# One call of the device tool on an nvidia-h200 (`run` with command `bash benchmarks/run_h200.sh`, timeout 600):
# the GPU tests, then the decode benchmark; everything lands in $OUT. About 5-6 minutes of device time
# (Triton compiles ~1 min, kernel check + sweep ~1 min, decode rows ~3 min; BENCH_BUDGET caps the optional rows).
# Afterwards copy decode_h200.json, decode_h200.md, bench.log, pytest_gpu.log and gpu_report.txt from the
# returned files into benchmarks/results/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TEST_TIMEOUT:-120}" python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_engine.py > "$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"
timeout "${BENCH_TIMEOUT:-420}" python benchmarks/decode_h200.py --budget-s "${BENCH_BUDGET:-360}" --runs 2 \
    --out "$OUT/decode_h200" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v "^  " "$OUT/bench.log" | tail -60
