"""Plain-torch attention, the ground truth for kernels/flash_attention.py and its fallback.

    O = softmax(sm_scale * Q K^T + mask) V,   computed in fp32 and returned in the input dtype.

attention_reference works on (B, H, T, D); attention_varlen_reference on packed (total_tokens, H, D)
with cu_seqlens, one sequence at a time, so attention never crosses a boundary. Same signatures as
flash_attention / flash_attention_varlen. Memory is O(T^2): meant for tests and small inputs.
"""

import torch


def attention_reference(q, k, v, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T, D); differentiable."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, T, T)
    if causal:
        seq_len = q.shape[-2]
        future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True,
                               sm_scale: float | None = None) -> torch.Tensor:
    """(total_tokens, H, D) packed by cu_seqlens (N + 1,) -> (total_tokens, H, D); differentiable."""
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if max(lengths) > max_seqlen:
        raise ValueError(f"kernels/reference.py: max_seqlen={max_seqlen} is shorter than the longest "
                         f"sequence ({max(lengths)}) in cu_seqlens")
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # (L, H, D) -> (1, H, L, D) for the dense reference, and back.
        seq = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        outputs.append(attention_reference(*seq, causal=causal, sm_scale=sm_scale)[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


def outputs_and_gradients(kernel_fn, reference_fn, inputs) -> dict:
    """{"out"|"dq"|"dk"|"dv": (kernel's, fp32 reference's)} for q, k, v = `inputs`, both backpropagating
    the same random upstream gradient. Shared by the tests and the benchmark's correctness check."""
    q, k, v = (x.clone().requires_grad_() for x in inputs)
    out = kernel_fn(q, k, v)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in inputs)
    ref = reference_fn(q32, k32, v32)
    ref.backward(grad_out.float())
    return {"out": (out, ref), "dq": (q.grad, q32.grad), "dk": (k.grad, k32.grad), "dv": (v.grad, v32.grad)}
