#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_quick.sh`, timeout 400): the GPU tests that
# cover the batch-1 listed path (kernels, decode ops, forced-mask decode against transformers on the built-in
# families' tiny configs), then the decode-step timeline (benchmarks/run_h200_timeline.sh). Logs land in $OUT.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
[ -z "$SKIP_TESTS" ] && timeout "${TEST_TIMEOUT:-150}" python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_engine.py -k "pdl or attention or decode_ops or forced_masks or generation_equals" \
    > "$OUT/pytest_gpu.log" 2>&1
[ -z "$SKIP_TESTS" ] && tail -3 "$OUT/pytest_gpu.log"
bash benchmarks/run_h200_timeline.sh
