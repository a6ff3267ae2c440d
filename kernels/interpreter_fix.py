"""Work around a Triton 3.6 interpreter bug with numpy >= 2.4 (CPU tests only; GPUs never reach it).

The interpreter holds every scalar as a 1-element numpy array and converts it with int(array) when a
loop bound is a runtime value (`for start_n in range(lo, hi, BLOCK_N)` with hi loaded from cu_seqlens).
numpy 2.4 rejects int() on arrays with ndim > 0 ("only 0-dimensional arrays can be converted to Python
scalars"), so every kernel with a data-dependent loop fails under TRITON_INTERPRET=1. Reported as
triton-lang/triton#9171, fixed upstream by #9172 (`int(self.handle.data.squeeze())`).

`apply()` installs that one-line fix for this process and does nothing when it is not needed (a
numpy that still accepts the conversion). kernels/runtime.py, which every kernel file imports, calls it
once at import under the interpreter, so `TRITON_INTERPRET=1` alone runs them on CPU; with a GPU
nothing is patched.

    from slm.kernels import interpreter_fix; interpreter_fix.apply()
"""

import numpy as np


def _needs_fix() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def apply() -> bool:
    """Install the fix once if this numpy needs it; returns True when it is in place."""
    from triton.runtime import interpreter

    if not _needs_fix():
        return False
    if getattr(interpreter._patch_lang_tensor, "_numpy24_fixed", False):
        return True
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Same as upstream #9172: a 1-element array becomes a 0-d one before int().
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._numpy24_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
