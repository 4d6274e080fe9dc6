#!/bin/bash
# The full GPU measurement (`run` with command `bash benchmarks/run_h200.sh`, timeout 600): the GPU tests, then the
# decode benchmark; everything lands in $OUT. The two halves fit one call only with short limits, so they can also
# run as two calls: `SKIP_BENCH=1 bash benchmarks/run_h200.sh` (tests, ~4 min) and `SKIP_TESTS=1 bash
# benchmarks/run_h200.sh` (benchmark, ~6-7 min: sweep, kernel table, all decode rows; BENCH_BUDGET caps the
# optional rows). Afterwards copy decode_h200.json, decode_h200.md, bench.log, pytest_gpu.log and gpu_report.txt
# from the returned files into benchmarks/results/ (logs into results/runN/).
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
if [ -z "$SKIP_TESTS" ]; then
    timeout "${TEST_TIMEOUT:-280}" python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_engine.py tests/test_fused_mlp.py > "$OUT/pytest_gpu.log" 2>&1
    tail -3 "$OUT/pytest_gpu.log"
fi
if [ -z "$SKIP_BENCH" ]; then
    # CONFIGS=path: launch configurations of an earlier run's JSON instead of a fresh sweep
    timeout "${BENCH_TIMEOUT:-560}" python benchmarks/decode_h200.py --budget-s "${BENCH_BUDGET:-500}" --runs 2 \
        ${CONFIGS:+--configs "$CONFIGS"} --out "$OUT/decode_h200" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?"
    grep -v "^  " "$OUT/bench.log" | tail -60
fi
