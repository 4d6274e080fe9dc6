#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_v5.sh`, timeout 330) for version 5 (the batch-1
# MLP in one persistent launch): its GPU tests (bitwise equal to the three launches, graph replays; forced-mask
# decode against transformers), then Llama-3.1-8B batch 1 with run 6's launch configurations (no sweep): the MLP
# block table (three launches against the persistent kernel at 0 / 50 / 90%), dense, 0.50, and versions 4 and 5
# side by side in the same loop. Copy the returned files to benchmarks/results/decode_h200_v5.* and
# benchmarks/results/run7/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TEST_TIMEOUT:-120}" python -m pytest -m gpu -q -p no:cacheprovider tests/test_fused_mlp.py \
    tests/test_engine.py -k "fused_mlp or v5" > "$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"
timeout "${BENCH_TIMEOUT:-190}" python benchmarks/decode_h200.py --models "${MODELS:-llama-3.1-8b}" --batches 1 \
    --levels 0.5 --no-nonuniform --contexts "" --runs 2 --configs benchmarks/results/decode_h200.json \
    --no-kernel-table --v5 --mlp-block --budget-s "${BENCH_BUDGET:-175}" --out "$OUT/decode_h200_v5" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -E "tok/s|mlp block|v4 tokens|v5 tokens|FAILED|budget|Error|error" "$OUT/bench.log" | tail -40
