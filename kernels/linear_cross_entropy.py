"""Fused linear + cross-entropy in Triton: the LM-head loss without the (tokens x vocabulary) logits.

    logits = hidden @ weight.T                     hidden (N, E), weight (V, E) the tied embedding
    loss_i = logsumexp(logits_i) - logits_i[t_i]   0 where t_i == ignore_index
    d loss_i / d logits_i = softmax(logits_i) - onehot(t_i)

Materialising the logits costs N x V values (16k tokens x 50,272 in fp32 = 3.1 GiB, plus as much again
for their gradient). Here the tokens are processed in chunks of C rows; per chunk:
    1. logits = h_chunk @ W.T                       (C, V), a torch GEMM in the compute dtype
    2. the Triton kernel reads each row twice: an online log-sum-exp gives the loss, then the row is
       overwritten in place by its gradient (softmax - onehot) * scale_i, so no second buffer is needed
    3. grad_hidden[chunk] = dlogits @ W             (C, E)
       grad_weight += dlogits.T @ h_chunk           (V, E), accumulated in fp32 across chunks
The chunk's logits are then dropped. Because the gradients are computed in the forward (the only time
the logits exist), the backward only multiplies them by grad_output: recomputing the logits there would
cost a third GEMM per chunk. With reduction="none" the upstream gradient differs per token and
grad_weight (a sum over tokens) cannot be rescaled afterwards, so that mode computes only the losses in
the forward and repeats the chunks in the backward with scale_i = grad_output[i].

Chunk size (`chunk_size`), as in Liger-Kernel: C = next_power_of_2(ceil(N / ceil(V / E))), so the
logits chunk holds C x V < 2 x (N x E + V) values - about twice the hidden states - whatever N is
(next_power_of_2 at most doubles, the ceils add at most one row). At OPT-350M's E = 1024, V = 50,272 and
N = 16,384 tokens: 32 chunks of 512 rows, 49 MiB of fp16 logits per chunk instead of 1.5 GiB at once.
Peak memory beyond the inputs: grad_hidden (N x E, compute dtype) + grad_weight (V x E fp32) + one logits
chunk (< 2 (N E + V) values, compute dtype), plus for fp16/bf16 one (V x E) product per chunk before it is
added to the fp32 grad_weight. It never grows with N x V.

Precision: the GEMMs run in the compute dtype (hidden's dtype, or autocast's when autocast is on), so the
logits are rounded to it like those of `hidden @ weight.T`; the kernel upcasts them and does the softmax,
log-sum-exp and loss in fp32. Losses are returned in fp32; grad_weight is accumulated in fp32 (summing
chunks in bf16 would lose ~2 bits per doubling), then cast to the weight's dtype.

Any vocabulary size: the kernel walks a row in BLOCK_V blocks, masking the tail (50,272 = 3 x 16,384 + 1,120).
Ignored rows get loss 0 and gradient 0; reduction="mean" divides by the number of non-ignored tokens
(NaN when there are none, as torch's cross_entropy).

References: Liger-Kernel ops/fused_linear_cross_entropy.py and ops/cross_entropy.py (chunking, in-place
gradient); Milakov & Gimelshein, "Online normalizer calculation for softmax" (arXiv:1805.02867);
Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009).

    from slm.kernels.linear_cross_entropy import linear_cross_entropy
    loss = linear_cross_entropy(hidden, model.embed.weight, targets, ignore_index=-100, reduction="sum")

Tests: `pytest tests/test_linear_cross_entropy.py` (CPU through TRITON_INTERPRET=1). Shared memory, registers
and spills on an A10G or H100, without one: `python -m slm.kernels.compile_check 86 --ops linear_cross_entropy`.
"""

import torch
import triton
import triton.language as tl

from slm.kernels import runtime

# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    LOGITS,  # (C, V) in: one chunk's logits; out when WRITE_GRAD: d total / d logits, same dtype
    TARGETS,  # (C,) int64 target ids, or ignore_index
    GRAD_SCALE,  # (C,) fp32, d total / d loss_i (stride 0 when one value serves every row)
    LOSS,  # (C,) fp32 out: loss_i
    stride_logits,  # row stride of LOGITS; columns are unit-stride
    stride_scale,
    V,  # vocabulary size
    ignore_index,
    WRITE_GRAD: tl.constexpr,  # False: losses only (no gradient wanted, or reduction="none"'s forward)
    BLOCK_V: tl.constexpr,  # columns per step, a power of two; the last block is masked
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: C x V passes 2**31 at C = 43k rows of 50,272
    logits_row = LOGITS + row * stride_logits
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        # The buffer still holds this row's logits: overwrite them with the row's gradient, zero.
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                tl.store(logits_row + start + cols, tl.zeros([BLOCK_V], dtype=LOGITS.dtype.element_ty),
                         mask=start + cols < V)
        return

    # Pass 1: online log-sum-exp. m is the running max, d the running sum of exp(x - m); when a block
    # raises the max, the sum so far is rescaled by exp(m_old - m_new). Masked columns read -inf and add
    # exp(-inf) = 0. The first block always holds a real column, so m is finite after it.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    # Read before pass 2 overwrites the row.
    target_logit = tl.load(logits_row + target).to(tl.float32)
    tl.store(LOSS + row, lse - target_logit)

    # Pass 2: softmax from the saved lse (no second normalisation), minus one at the target, scaled.
    if WRITE_GRAD:
        scale = tl.load(GRAD_SCALE + row * stride_scale)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(logits_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse)
            grad = tl.where(start + cols == target, p - 1.0, p) * scale
            tl.store(logits_row + start + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------

_WHERE = "kernels/linear_cross_entropy.py"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("sum", "mean", "none")


def launch_config(vocab: int) -> dict:
    """Columns per step and warps: 16,384 fp32 columns over 16 warps is 32 values per thread, enough to
    keep the loads wide without spilling; smaller vocabularies take one block."""
    block_v = min(16384, triton.next_power_of_2(vocab))
    return dict(BLOCK_V=block_v, num_warps=16 if block_v >= 8192 else 8 if block_v >= 2048 else 4)


def chunk_size(tokens: int, vocab: int, hidden_dim: int) -> int:
    """Rows per chunk: C = next_power_of_2(ceil(N / ceil(V / E))), so C x V < 2 x (N x E + V) (see the docstring)."""
    return triton.next_power_of_2(max(1, triton.cdiv(tokens, triton.cdiv(vocab, hidden_dim))))


def _chunked_loss(hidden, weight, targets, ignore_index, grad_scale, want_hidden, want_weight):
    """The launcher: hidden (N, E), weight (V, E) in one compute dtype, on any device (meta tensors for
    kernels/compile_check.py). Returns loss (N,) fp32 and, when wanted and grad_scale (N,) is given,
    grad_hidden (N, E) in the compute dtype and grad_weight (V, E) fp32."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    write_grad = grad_scale is not None and (want_hidden or want_weight)
    cfg = launch_config(vocab)
    loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if write_grad and want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if write_grad and want_weight else None
    scale = grad_scale if write_grad else loss  # a placeholder pointer when no gradient is written

    step = chunk_size(tokens, vocab, hidden.shape[1])
    for start in range(0, tokens, step):
        end = min(start + step, tokens)
        h = hidden[start:end]  # (C, E)
        logits = h @ weight.T  # (C, V), contiguous
        with runtime.on_device(logits):  # the inputs' GPU, whatever the current device is
            _cross_entropy_kernel[(end - start,)](
                logits, targets[start:end], scale[start:end], loss[start:end],
                logits.stride(0), scale.stride(0), vocab, ignore_index,
                WRITE_GRAD=write_grad, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
            )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # logits now hold dlogits
        if grad_weight is None:
            continue
        if logits.dtype == torch.float32:
            grad_weight.addmm_(logits.T, h)
        else:
            grad_weight += logits.T @ h  # a half GEMM (fp32 accumulation inside), summed across chunks in fp32
    return loss, grad_hidden, grad_weight


def _check(hidden, weight, targets, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_WHERE}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{_WHERE}: hidden must be (N, E) and weight (V, E) with one E, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"{_WHERE}: targets must be ({hidden.shape[0]},) int64 to match hidden's rows, got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{_WHERE}: {name}.dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{_WHERE}: hidden, weight and targets must be on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    runtime.check_device(_WHERE, hidden.device)


# ---------------------------------------------------------------------------------------------------
# Autograd and the public API
# ---------------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, compute_dtype):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        ctx.reduction, ctx.ignore_index, ctx.dtypes = reduction, ignore_index, (hidden.dtype, weight.dtype)
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        if reduction == "none":  # gradients need grad_output per token: computed in the backward
            ctx.save_for_backward(h, w, targets)
            return _chunked_loss(h, w, targets, ignore_index, None, False, False)[0]
        n_valid = (targets != ignore_index).sum()
        # d total / d loss_i, one value for every row: a stride-0 view, and no device sync for n_valid.
        scale = torch.ones(1, device=h.device) if reduction == "sum" else 1.0 / n_valid.float().reshape(1)
        loss, grad_hidden, grad_weight = _chunked_loss(h, w, targets, ignore_index, scale.expand(len(targets)),
                                                       want_hidden, want_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.sum() if reduction == "sum" else loss.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if ctx.reduction == "none":
            h, w, targets = ctx.saved_tensors
            _, grad_hidden, grad_weight = _chunked_loss(h, w, targets, ctx.ignore_index, grad_output.float(),
                                                        want_hidden, want_weight)
        else:
            grad_hidden, grad_weight = ctx.saved_tensors
            # Out of place: a retained graph may run this backward again.
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_output
            grad_weight = None if grad_weight is None else grad_weight * grad_output
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden.to(hidden_dtype),
                None if grad_weight is None else grad_weight.to(weight_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T against targets, without materialising the logits.

    hidden (N, E), weight (V, E), targets (N,) int64. Returns fp32: a scalar for "sum" and "mean" (over
    non-ignored tokens), (N,) for "none". Differentiable in hidden and weight. Under autocast the GEMMs run
    in autocast's dtype; otherwise hidden and weight must share a dtype, as for `hidden @ weight.T`.
    """
    _check(hidden, weight, targets, reduction)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype:
        raise TypeError(f"{_WHERE}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype "
                        "outside autocast")
    else:
        compute_dtype = hidden.dtype
    vocab = weight.shape[0]
    if not ((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all():  # one device sync
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= vocab))]
        raise ValueError(f"{_WHERE}: targets must be in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {bad[:5].tolist()}")
    with torch.autocast(device_type, enabled=False):  # the GEMMs' dtype is chosen above, explicitly
        return _LinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), reduction, compute_dtype)
