"""The registry's "attention" op: three interchangeable implementations with one signature.

    attention(q, k, v, *, causal=True, scale=None, mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0)

Dense (cu_seqlens None): q (B, H, Tq, D); k, v (B, H, Tk, D), Tk >= Tq -> (B, H, Tq, D).
    mask None and causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as a decode step is);
    mask given: bool, broadcastable to (B, 1, Tq, Tk), True = may attend, the whole rule (causal is ignored).
Packed (cu_seqlens (N+1,) int32 on q's device): q, k, v (total, H, D) -> (total, H, D); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1], causal within itself; no mask; max_seqlen >= the longest sequence.
scale defaults to 1/sqrt(D); dropout_p drops attention probabilities (training).

    "eager"   plain torch, the reference: softmax in fp32 as Hugging Face's eager path; packed rows one
              sequence at a time. O(T^2) memory.
    "sdpa"    torch's scaled_dot_product_attention. Packed rows on CPU: one causal SDPA call per sequence;
              on CUDA: our Triton varlen kernel (SDPA would need a T x T mask and leave its flash backend),
              or per sequence when dropout_p > 0.
    "triton"  ours (kernels/flash_attention.py), dense and packed; a masked call or Tq != Tk (decode
              steps against a KV cache) is served by SDPA. No dropout: dropout_p > 0 is an error.

Tests: `pytest tests/test_registry.py tests/test_kernel_conformance.py`.
"""

import torch
import torch.nn.functional as F


def _check(q, mask, cu_seqlens, where: str) -> None:
    if cu_seqlens is not None and mask is not None:
        raise ValueError(f"kernels/attention.py ({where}): packed rows (cu_seqlens) take no mask; "
                         "each sequence is causal within itself")
    rank = 3 if cu_seqlens is not None else 4
    if q.dim() != rank:
        layout = "(total, H, D) when cu_seqlens is given" if rank == 3 else "(B, H, Tq, D) without cu_seqlens"
        raise ValueError(f"kernels/attention.py ({where}): q must be {layout}, got shape {tuple(q.shape)}")


def _lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The packed sequences' lengths as host ints (a device sync on CUDA; free on CPU)."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def _causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """(Tq, Tk) bool: query i sees keys j <= i + (Tk - Tq)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)


# -------------------------------------------------------------------------------------------- eager
def eager_attention(q, k, v, *, causal=True, scale=None, mask=None, cu_seqlens=None, max_seqlen=None,
                    dropout_p=0.0):
    """The reference: softmax(scale * q kᵀ + mask) v in plain torch, the softmax in fp32."""
    _check(q, mask, cu_seqlens, "eager")
    if cu_seqlens is None:
        return _eager(q, k, v, causal, scale, mask, dropout_p)
    pieces = zip(*(x.split(_lengths(cu_seqlens)) for x in (q, k, v)))      # (L, H, D) each
    return torch.cat([_eager(*(x.transpose(0, 1) for x in piece), causal, scale, None, dropout_p).transpose(0, 1)
                      for piece in pieces])


def _eager(q, k, v, causal: bool, scale, mask, dropout_p: float):
    """(..., Tq, D) queries against (..., Tk, D) keys and values."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale                             # (..., Tq, Tk)
    allowed = mask if mask is not None or not causal else _causal_mask(*scores.shape[-2:], q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v


# --------------------------------------------------------------------------------------------- sdpa

def sdpa_attention(q, k, v, *, causal=True, scale=None, mask=None, cu_seqlens=None, max_seqlen=None,
                   dropout_p=0.0):
    """torch's scaled_dot_product_attention; packed rows per sequence on CPU, our varlen kernel on CUDA."""
    _check(q, mask, cu_seqlens, "sdpa")
    if cu_seqlens is not None:
        if q.device.type == "cuda" and dropout_p == 0:   # our kernel has no dropout; per sequence has
            return triton_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens,
                                    max_seqlen=max_seqlen)
        return _sdpa_per_sequence(q, k, v, _lengths(cu_seqlens), causal, scale, dropout_p)
    t_q, t_k = q.shape[-2], k.shape[-2]
    if mask is None and causal and t_q != t_k:   # SDPA's is_causal is top-left aligned; ours bottom-right
        mask = _causal_mask(t_q, t_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal and mask is None, scale=scale)


def _sdpa_per_sequence(q, k, v, lengths: list[int], causal: bool, scale, dropout_p: float):
    """Packed (total, H, D) rows as one SDPA call per sequence: what sdpa does with packed rows on CPU.

    Why: torch's CPU SDPA has a fast kernel for plain causal attention but not for a mask, and the
    work shrinks from T^2 per row to the sum of the squared sequence lengths (BENCHMARKS.md). Split,
    not sliced, so that the backward pass concatenates the gradients instead of zero-filling a
    full-size tensor per sequence; 4-D pieces (1, H, L, D), as 3-D ones take SDPA's slow path.
    """
    pieces = zip(*(x.split(lengths) for x in (q, k, v)))                   # (L, H, D) each
    return torch.cat([F.scaled_dot_product_attention(
        *(x.transpose(0, 1).unsqueeze(0) for x in piece), dropout_p=dropout_p, is_causal=causal, scale=scale,
    )[0].transpose(0, 1) for piece in pieces])


# ------------------------------------------------------------------------------------------- triton

def triton_attention(q, k, v, *, causal=True, scale=None, mask=None, cu_seqlens=None, max_seqlen=None,
                     dropout_p=0.0):
    """Our fused kernels (kernels/flash_attention.py); masked or Tq != Tk calls (decode steps) go to SDPA."""
    # Imported on use: triton exists on Linux x86-64 only, and every other implementation works without it.
    from slm.kernels.flash_attention import flash_attention, flash_attention_varlen

    _check(q, mask, cu_seqlens, "triton")
    if dropout_p > 0:
        raise ValueError(f"kernels/attention.py (triton): dropout_p={dropout_p}, but the Triton kernels have "
                         "no attention dropout; use attention 'sdpa' or 'eager', or a config with "
                         "attention_dropout=0")
    if cu_seqlens is not None:
        if max_seqlen is None:
            max_seqlen = max(_lengths(cu_seqlens))
        return flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, sm_scale=scale)
    if mask is not None or q.shape[-2] != k.shape[-2]:
        return sdpa_attention(q, k, v, causal=causal, scale=scale, mask=mask)
    return flash_attention(q, k, v, causal=causal, sm_scale=scale)
