"""Custom Triton kernels for slm, each with a plain-torch reference, and the registry that names them.

    from slm import kernels
    kernels.available()                      # {"attention": ["eager", "sdpa", "triton"], "layer_norm": [...], ...}
    attention = kernels.get("attention", "triton")
    kernels.register("attention", "mine", fn)   # fn takes the reference's signature; slm.OPT(kernels={...}) uses it

    from slm.kernels import flash_attention, flash_attention_varlen
    flash_attention(q, k, v, causal=True, sm_scale=None)                                   # (B, H, T, D)
    flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, sm_scale=None)    # (total, H, D)

On CPU tensors the kernels need TRITON_INTERPRET=1 set before triton is imported; otherwise they raise
a RuntimeError saying so. triton installs on Linux x86-64 only; without it the registry and the torch
implementations still work (slm needs them) and only the "triton" implementations are missing.
Tests: `pytest tests/test_registry.py tests/test_kernel_conformance.py tests/test_flash_attention.py`.

The kernels' code lives in the repository's top-level kernels/ folder, which is no package of its own
(no __init__.py): Hugging Face's `kernels` package, which transformers imports, owns that import name.
In a checkout this package adds the folder to its __path__; a wheel copies the folder's modules here
(setup.py's build_py), so `slm` is the only name the project installs.
"""

import importlib.util
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2] / "kernels"
if not (Path(__file__).parent / "registry.py").exists() and (_CHECKOUT / "registry.py").exists():
    __path__.append(str(_CHECKOUT))  # a checkout (editable install, or run from the root): the code is there

from slm.kernels import interpreter_fix
from slm.kernels.attention import eager_attention, sdpa_attention, triton_attention
from slm.kernels.reference import (attention_reference, attention_varlen_reference, layer_norm_reference,
                                   linear_cross_entropy_reference)
from slm.kernels.registry import REFERENCE, add_arguments, available, get, parse, register

__all__ = ["attention_reference", "attention_varlen_reference", "layer_norm_reference",
           "linear_cross_entropy_reference", "interpreter_fix", "REFERENCE", "add_arguments", "available", "get",
           "parse", "register"]

register("attention", "eager", eager_attention)
register("attention", "sdpa", sdpa_attention)
register("layer_norm", "torch", layer_norm_reference)
register("linear_cross_entropy", "torch", linear_cross_entropy_reference)

if importlib.util.find_spec("triton") is not None:
    from slm.kernels.flash_attention import flash_attention, flash_attention_varlen
    from slm.kernels.layer_norm import layer_norm
    from slm.kernels.linear_cross_entropy import linear_cross_entropy

    register("attention", "triton", triton_attention)
    register("layer_norm", "triton", layer_norm)
    register("linear_cross_entropy", "triton", linear_cross_entropy)
    __all__ += ["flash_attention", "flash_attention_varlen", "layer_norm", "linear_cross_entropy"]
