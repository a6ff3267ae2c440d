"""Custom Triton kernels for slm, each with a plain-torch reference.

    from kernels import flash_attention, flash_attention_varlen
    flash_attention(q, k, v, causal=True, sm_scale=None)                                   # (B, H, T, D)
    flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, sm_scale=None)    # (total, H, D)

On CPU tensors the kernels need TRITON_INTERPRET=1 set before triton is imported; otherwise they raise
a RuntimeError saying so. Tests: `pytest tests/test_flash_attention.py`.
"""

from kernels import interpreter_fix
from kernels.flash_attention import flash_attention, flash_attention_varlen
from kernels.reference import attention_reference, attention_varlen_reference

__all__ = ["flash_attention", "flash_attention_varlen", "attention_reference", "attention_varlen_reference",
           "interpreter_fix"]
