#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_norm.sh`, timeout 240) for the split norm of
# session 3: the GPU tests it touches, then the Llama-3.1-8B batch-1 decode rows (dense, 0.40 / 0.50 / 0.60) with
# the split norm and, side by side in the same loop, the one-program norm it replaces; the kernel table and the
# step's small kernels again. Launch configurations come from run 3's sweep (benchmarks/results/decode_h200.json),
# so no sweep runs. Worst case 75 + 140 s. Copy the returned files to benchmarks/results/decode_h200_run4.* and
# benchmarks/results/run4/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WISPARSE_GPU_REPORT=$OUT/gpu_report.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout 75 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py \
    -k "torch_compile or decode_ops or (forced_masks and llama)" > "$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"
timeout 140 python benchmarks/decode_h200.py --models llama-3.1-8b --batches 1 --levels 0.4,0.5,0.6 \
    --no-nonuniform --contexts "" --no-v4 --norm-compare --runs 2 --configs benchmarks/results/decode_h200.json --budget-s 125 \
    --out "$OUT/decode_h200_run4" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v "^  " "$OUT/bench.log" | tail -40
