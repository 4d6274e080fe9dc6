#!/bin/bash
# A short device call (`run` with command `bash benchmarks/run_h200_timeline.sh`, timeout 300): the kernel timeline
# of the Llama-3.1-8B decode step inside graph replays, dense and uniform 0.50, version 4 (and version 3 with V3=1),
# with the launch configurations of results/decode_h200.json. Copy $OUT into benchmarks/results/timeline/.
export TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TL_TIMEOUT:-200}" python benchmarks/timeline_h200.py --whole-lists --sublists "$SUBLISTS" --out "$OUT/v4" > "$OUT/timeline_v4.log" 2>&1
echo "v4 rc=$?"; cat "$OUT/timeline_v4.log" | grep -v Warning | tail -40
if [ -n "$V3" ]; then
    timeout 150 python benchmarks/timeline_h200.py --v3 --out "$OUT/v3" > "$OUT/timeline_v3.log" 2>&1
    echo "v3 rc=$?"; tail -34 "$OUT/timeline_v3.log"
fi
rm -f "$OUT"/*/trace_*.json  # large; timeline.json keeps every kernel of one replay
