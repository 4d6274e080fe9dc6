"""Produces benchmarks/results/decode_h200.{json,md}: `python benchmarks/decode_h200.py` (same as `wisparse bench`).

Needs a CUDA GPU (measured on an NVIDIA H200); see wisparse/engine/bench.py for what each row means.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wisparse.engine.bench import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
