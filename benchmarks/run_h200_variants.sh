#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_variants.sh`, timeout 500): the GPU tests of the
# batch-1 listed path and the norm kernels, then the decode-step timeline (benchmarks/timeline_h200.py) with the
# variants in $TL_ARGS (norm modes, list-GEMV configurations per group), each measured in the same loop as the
# default. Logs land in $OUT; copy them into benchmarks/results/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
if [ -z "$SKIP_TESTS" ]; then
    timeout "${TEST_TIMEOUT:-200}" python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_engine.py -k "pdl or attention or decode_ops or forced_masks or generation_equals" \
        > "$OUT/pytest_gpu.log" 2>&1
    tail -3 "$OUT/pytest_gpu.log"
fi
eval "timeout ${TL_TIMEOUT:-330} python benchmarks/timeline_h200.py $TL_ARGS --out $OUT/v4" > "$OUT/timeline_v4.log" 2>&1
echo "timeline rc=$?"; grep -v Warning "$OUT/timeline_v4.log" | grep -E "tok/s|Error|error" | tail -40
rm -f "$OUT"/*/trace_*.json  # large; timeline.json keeps every kernel of one replay
