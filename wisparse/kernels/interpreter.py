"""Helpers for running the Triton kernels in Triton's CPU interpreter (`TRITON_INTERPRET=1`), used by tests.

Triton 3.6's interpreter keeps reductions as 1-element arrays, and with NumPy 2 `int()` of such an array (a loop
bound like `range(0, cnt, BLOCK_K)` with `cnt = tl.sum(...)`) raises. `patch_interpreter()` makes `__index__`
take the single element instead. It changes nothing on GPUs (the interpreter is not used there).
"""
from __future__ import annotations


def patch_interpreter() -> None:
    import numpy as np
    import triton.runtime.interpreter as ti

    if getattr(ti, "_wisparse_patched", False):
        return
    original = ti._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._wisparse_patched = True
