#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_sweep.sh`, timeout 200): the batch-1 sparse
# configurations of the q/k/v (4096x6144x3) and o (4096x4096x1) shapes swept again with the new SWEEP_LIST
# candidates (the other shapes keep run 3's), then Llama-3.1-8B batch 1: dense, 0.50, the one-program norm beside
# it, and version 4 (fused attention) with the split norm. Copy the returned files to
# benchmarks/results/decode_h200_run5.* and benchmarks/results/run5/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${BENCH_TIMEOUT:-165}" python benchmarks/decode_h200.py --models llama-3.1-8b --batches 1 --levels 0.5 \
    --no-nonuniform --contexts "" --runs 2 --configs benchmarks/results/decode_h200.json \
    --resweep 4096x6144x3,4096x4096x1 --no-kernel-table --budget-s "${BENCH_BUDGET:-150}" \
    --out "$OUT/decode_h200_run5" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -E "sweep|tok/s|split norm|v4 tokens|step kernel|FAILED|budget" "$OUT/bench.log" | tail -40
