"""Plain-torch references of the kernels' ops: the ground truth every implementation is tested against.

    O = softmax(sm_scale * Q K^T + mask) V,   computed in fp32 and returned in the input dtype.

attention_reference works on (B, H, T, D); attention_varlen_reference on packed (total_tokens, H, D)
with cu_seqlens, one sequence at a time, so attention never crosses a boundary. Same signatures as
flash_attention / flash_attention_varlen; both are the registry's "eager" attention (kernels/attention.py,
which also takes masks, dropout and decode steps) run in fp32. Memory is O(T^2): for tests and small inputs.

layer_norm_reference and linear_cross_entropy_reference are the registry's "torch" implementations of
"layer_norm" and "linear_cross_entropy" (kernels/registry.py), with the signatures every other
implementation of those ops takes.
"""

import torch
import torch.nn.functional as F

from slm.kernels.attention import eager_attention


def attention_reference(q, k, v, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T, D); differentiable. The registry's eager attention, computed in fp32."""
    out = eager_attention(q.float(), k.float(), v.float(), causal=causal, scale=sm_scale)
    return out.to(q.dtype)


def attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True,
                               sm_scale: float | None = None) -> torch.Tensor:
    """(total_tokens, H, D) packed by cu_seqlens (N + 1,) -> (total_tokens, H, D); differentiable."""
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if longest > max_seqlen:
        raise ValueError(f"kernels/reference.py: max_seqlen={max_seqlen} is shorter than the longest "
                         f"sequence ({longest}) in cu_seqlens")
    out = eager_attention(q.float(), k.float(), v.float(), causal=causal, scale=sm_scale, cu_seqlens=cu_seqlens,
                          max_seqlen=max_seqlen)   # one sequence at a time
    return out.to(q.dtype)


def layer_norm_reference(x, weight, bias, eps: float, residual=None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim: x, residual (..., N); weight, bias (N,) or None.

    Statistics in fp32; the output has the dtype of x + residual (x's own when they agree). The add is
    x + residual in that order, so a post-LN block `norm(x + h)` gives the same bits as before the op.
    """
    s = x if residual is None else x + residual
    n = s.shape[-1:]
    y = F.layer_norm(s.float(), n, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return y.to(s.dtype)


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index: int = -100,
                                   reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T against targets: hidden (N, E), weight (V, E), targets (N,).

    The logits (N, V) are materialised and taken to fp32 for the softmax (the matmul runs in the inputs'
    dtype, or autocast's); reduction "sum", "mean" (over the targets that are not ignore_index) or
    "none" (N,). Gradients flow to hidden and weight.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}, expected 'sum', 'mean' or 'none'")
    logits = hidden @ weight.T                                    # (N, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
