#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_tune.sh`, timeout 300): the batch-1 sparse
# configurations of the two acceptance matrices and of Llama-3.1-8B's gate|up and down swept again with the new
# SWEEP_LIST candidates (the other shapes keep run 6's), the kernel table (with batch 8 reading every weight row
# beside the row-skipping masked mode), and Llama-3.1-8B batch 1 dense / 0.50 (versions 3 and 4). Copy the returned
# files to benchmarks/results/decode_h200_run9.* and benchmarks/results/run9/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${BENCH_TIMEOUT:-280}" python benchmarks/decode_h200.py --models llama-3.1-8b --batches 1 --levels 0.5 \
    --no-nonuniform --contexts "" --runs 2 --configs benchmarks/results/decode_h200.json \
    --resweep 4096x14336x1,14336x4096x1,4096x28672x2 --budget-s "${BENCH_BUDGET:-265}" \
    --out "$OUT/decode_h200_run9" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -E "sweep|kernel|tok/s|v4 tokens|FAILED|budget" "$OUT/bench.log" | tail -70
