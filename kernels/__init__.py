"""Custom Triton kernels for slm, each with a plain-torch reference, and the registry that names them.

    import kernels
    kernels.available()                      # {"attention": ["eager", "sdpa", "triton"], "layer_norm": [...], ...}
    attention = kernels.get("attention", "triton")
    kernels.register("attention", "mine", fn)   # fn takes the reference's signature; slm.OPT(kernels={...}) uses it

    from kernels import flash_attention, flash_attention_varlen
    flash_attention(q, k, v, causal=True, sm_scale=None)                                   # (B, H, T, D)
    flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, sm_scale=None)    # (total, H, D)

On CPU tensors the kernels need TRITON_INTERPRET=1 set before triton is imported; otherwise they raise
a RuntimeError saying so. triton installs on Linux x86-64 only; without it the registry and the torch
implementations still work (slm needs them) and only the "triton" implementations are missing.
Tests: `pytest tests/test_registry.py tests/test_kernel_conformance.py tests/test_flash_attention.py`.
"""

import importlib.util

from kernels import interpreter_fix
from kernels.attention import eager_attention, sdpa_attention, triton_attention
from kernels.reference import (attention_reference, attention_varlen_reference, layer_norm_reference,
                               linear_cross_entropy_reference)
from kernels.registry import REFERENCE, add_arguments, available, get, parse, register

register("attention", "eager", eager_attention)
register("attention", "sdpa", sdpa_attention)
register("layer_norm", "torch", layer_norm_reference)
register("linear_cross_entropy", "torch", linear_cross_entropy_reference)

if importlib.util.find_spec("triton") is not None:
    from kernels.flash_attention import flash_attention, flash_attention_varlen
    from kernels.layer_norm import layer_norm
    from kernels.linear_cross_entropy import linear_cross_entropy

    register("attention", "triton", triton_attention)
    register("layer_norm", "triton", layer_norm)
    register("linear_cross_entropy", "triton", linear_cross_entropy)

__all__ = ["flash_attention", "flash_attention_varlen", "attention_reference", "attention_varlen_reference",
           "layer_norm_reference", "linear_cross_entropy_reference", "interpreter_fix",
           "REFERENCE", "add_arguments", "available", "get", "parse", "register"]
