"""Fused causal/non-causal attention in Triton, forward and backward, dense and packed (varlen).

    O = softmax(S) V,   S = sm_scale * Q K^T  (masked: causal and/or sequence boundaries)

Forward, FlashAttention-2 style: each program owns BLOCK_M query rows of one (sequence, head) and streams
BLOCK_N keys at a time with an online softmax. Scores are kept in base 2 (S * log2(e)) so that the
exponentials are `exp2`, one hardware instruction; the running max m_i and running sum l_i rescale the
accumulator whenever the max grows. The log-sum-exp L = m_i + log2(l_i) (base 2) is saved per row.

Backward, with P recomputed from L instead of stored (T^2 memory would be the cost of storing it):
    delta_i = rowsum(dO_i * O_i)                          (preprocess kernel)
    P  = exp2(S * log2(e) - L)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
    dK = sm_scale * dS^T Q,       dQ = sm_scale * dS K
dK/dV and dQ come from two kernels (one loops over query blocks for a key block, the other over key
blocks for a query block), so no atomics are needed and the result is deterministic.

References: Dao, "FlashAttention-2" (arXiv:2307.08691), algorithms 1 and 2; Triton's fused-attention
tutorial (06-fused-attention.py) for the base-2 trick and the split of the causal loop.

Layouts and API:
    flash_attention(q, k, v, causal=True, sm_scale=None)                          (B, H, T, D)
    flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, sm_scale=None)  (total, H, D)
Packed (varlen): sequence i holds tokens cu_seqlens[i]:cu_seqlens[i+1] (int32, cu_seqlens[0] = 0) and
attends only to itself; max_seqlen (>= the longest sequence, not checked: that would cost a device sync)
sizes the grid. Left-padded batches (evaluation prefill) are served through varlen: the model
drops the pad tokens, builds cu_seqlens from the real lengths and scatters the output back.
Dense is the same kernels with cu_seqlens = [0, T, 2T, ...] (see `_row_strides`). Query and key lengths
are equal (self-attention); KV-cache decoding is not served here.

Supported: fp16 and bf16 (fp32 accumulation), fp32 (tl.dot runs as tf32 on a GPU); head dim 16..128
(padded to a power-of-two block with masks, e.g. 80 -> 128); any length, 1 included. Inputs may be
non-contiguous views (strides are passed); a head dim that is not unit-stride is copied once.

Launch settings depend on the device's shared memory per block, head dim and dtype (`launch_config`),
never on the sequence length, so a new length never re-tunes; no length is passed to the kernels (they
read cu_seqlens), and for head dims that are multiples of 16 every stride keeps its divisibility by 16,
so a new length does not recompile. Kernels launch on the inputs' GPU, whatever the current device.
`bench/attention.py --compile-only ARCH` checks every variant against sm_80 / 86 / 89 / 90 without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, CPU tests) computes bf16 tl.dot wrongly (it multiplies the raw
bf16 bit patterns held in numpy), so when the kernels were built by the interpreter the dot operands are
upcast to fp32 (`DOT_DTYPE`). On CPU tensors without the interpreter the launcher raises a RuntimeError.
With numpy >= 2.4, Triton 3.6's interpreter also needs kernels/interpreter_fix.py, which kernels/runtime.py
applies when it is imported under the interpreter (as every kernel file imports it).

Run the tests: `pytest tests/test_flash_attention.py`; the benchmark: `PYTHONPATH=. python bench/attention.py`.
"""

import math

import torch
import triton
import triton.language as tl

from slm.kernels import runtime

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _seq_bounds(CU_SEQLENS, BLOCK: tl.constexpr):
    """Every kernel's grid is (blocks of max_seqlen, heads, sequences): this program's first row within its
    sequence, its head, its sequence, that sequence's first packed row and its length."""
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    return tl.program_id(0) * BLOCK, tl.program_id(1), seq, seq_start, tl.load(CU_SEQLENS + seq + 1) - seq_start


@triton.jit
def _row0(seq, seq_start, head, stride_b, stride_t, stride_h):
    """Offset of row 0 of one (sequence, head), addressed as in `_row_strides`. 64-bit, because
    total_tokens times the token stride of a large packed batch can pass 2**31."""
    return seq.to(tl.int64) * stride_b + seq_start.to(tl.int64) * stride_t + head * stride_h


@triton.jit
def _fwd_inner(
    acc,  # (BLOCK_M, BLOCK_D) fp32, running numerator
    m_i,  # (BLOCK_M,) fp32, running max of base-2 scores
    l_i,  # (BLOCK_M,) fp32, running sum of exp2(score - m_i)
    q,  # (BLOCK_M, BLOCK_D) in DOT_DTYPE
    k_base,  # pointer to key row 0 of this (sequence, head)
    v_base,  # pointer to value row 0 of this (sequence, head)
    stride_kt,
    stride_vt,
    offs_m,  # (BLOCK_M,) query positions within the sequence
    seqlen,
    lo,
    hi,  # key blocks [lo, hi) are visited
    qk_scale,  # sm_scale * log2(e)
    MASKED: tl.constexpr,  # False: every key in [lo, hi) is visible to every query row of the block
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            visible = cols[None, :] < seqlen
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= cols[None, :])
            s = tl.where(visible, s, float("-inf"))
        # Online softmax: rescale what was accumulated under the old max by exp2(m_old - m_new).
        # Every valid query row sees key 0 in the first visited block, so m_new is finite there.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q,  # (rows, H, D) addressed through strides, see _row_strides
    K,
    V,
    O,
    LSE,  # (H, total) fp32, base-2 log-sum-exp per query row
    CU_SEQLENS,  # (N + 1,) int32
    stride_qb,  # per-sequence extra offset (0 for packed input)
    stride_qt,  # per-token
    stride_qh,  # per-head
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lh,
    qk_scale,  # sm_scale * log2(e)
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides BLOCK_M, so the causal split below falls on key-block edges
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    DOT_DTYPE: tl.constexpr,
):
    start_m, head, seq, seq_start, seqlen = _seq_bounds(CU_SEQLENS, BLOCK_M)
    if start_m >= seqlen:  # grid is sized for max_seqlen; shorter sequences end early
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + _row0(seq, seq_start, head, stride_qb, stride_qt, stride_qh)
    k_base = K + _row0(seq, seq_start, head, stride_kb, stride_kt, stride_kh)
    v_base = V + _row0(seq, seq_start, head, stride_vb, stride_vt, stride_vh)
    row_mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Two passes over the keys: blocks that need no mask (fully below the diagonal, or fully inside the
    # sequence when not causal), then the remaining blocks (diagonal / ragged tail) with the mask.
    if CAUSAL:
        full_end = start_m
        end = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        end = seqlen
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen,
                               0, full_end, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_DTYPE)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, seqlen,
                               full_end, end, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_DTYPE)

    acc = acc / l_i[:, None]
    o_base = O + _row0(seq, seq_start, head, stride_ob, stride_ot, stride_oh)
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_mask)
    # Saved for the backward: P = exp2(S * log2(e) - lse) needs no second pass over the keys.
    tl.store(LSE + head * stride_lh + seq_start + offs_m, m_i + tl.log2(l_i), mask=offs_m < seqlen)


@triton.jit
def _bwd_preprocess_kernel(
    O,  # (rows, H, D) through strides
    DO,  # (rows, H, D) through strides
    DELTA,  # (H, total) fp32 out: rowsum(dO * O)
    CU_SEQLENS,  # (N + 1,) int32
    stride_ob,
    stride_ot,
    stride_oh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    start_m, head, seq, seq_start, seqlen = _seq_bounds(CU_SEQLENS, BLOCK_M)
    if start_m >= seqlen:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    o_base = O + _row0(seq, seq_start, head, stride_ob, stride_ot, stride_oh)
    do_base = DO + _row0(seq, seq_start, head, stride_dob, stride_dot, stride_doh)
    o = tl.load(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + head * stride_lh + seq_start + offs_m, delta, mask=offs_m < seqlen)


@triton.jit
def _bwd_dkdv_kernel(
    Q,  # (rows, H, D) through strides
    K,
    V,
    DO,
    DK,  # out, (rows, H, D) through strides
    DV,  # out, (rows, H, D) through strides
    LSE,  # (H, total) fp32, base 2
    DELTA,  # (H, total) fp32
    CU_SEQLENS,  # (N + 1,) int32
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    stride_lh,
    sm_scale,
    qk_scale,  # sm_scale * log2(e)
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step of the loop
    BLOCK_N: tl.constexpr,  # key rows owned by this program; a multiple of BLOCK_M
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    start_n, head, seq, seq_start, seqlen = _seq_bounds(CU_SEQLENS, BLOCK_N)
    if start_n >= seqlen:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    k_base = K + _row0(seq, seq_start, head, stride_kb, stride_kt, stride_kh)
    v_base = V + _row0(seq, seq_start, head, stride_vb, stride_vt, stride_vh)
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
    q_base = Q + _row0(seq, seq_start, head, stride_qb, stride_qt, stride_qh)
    do_base = DO + _row0(seq, seq_start, head, stride_dob, stride_dot, stride_doh)
    lse_base = LSE + head * stride_lh + seq_start
    delta_base = DELTA + head * stride_lh + seq_start

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # queries before this key block never see it: start at the diagonal
        lo = start_n
    else:
        lo = 0
    for start_m in range(lo, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen, other=0.0)
        # Work on the transposed scores (keys x queries) so dK and dV accumulate without a transpose.
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        p_t = tl.exp2(s_t - lse[None, :])
        visible = offs_m[None, :] < seqlen
        if CAUSAL:
            visible = visible & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(DOT_DTYPE), do, dv)
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk)
    dk *= sm_scale

    dk_base = DK + _row0(seq, seq_start, head, stride_dkb, stride_dkt, stride_dkh)
    dv_base = DV + _row0(seq, seq_start, head, stride_dvb, stride_dvt, stride_dvh)
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,  # (rows, H, D) through strides
    K,
    V,
    DO,
    DQ,  # out, (rows, H, D) through strides
    LSE,  # (H, total) fp32, base 2
    DELTA,  # (H, total) fp32
    CU_SEQLENS,  # (N + 1,) int32
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_lh,
    sm_scale,
    qk_scale,  # sm_scale * log2(e)
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program; a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,  # key rows per step of the loop
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    start_m, head, seq, seq_start, seqlen = _seq_bounds(CU_SEQLENS, BLOCK_M)
    if start_m >= seqlen:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    q_base = Q + _row0(seq, seq_start, head, stride_qb, stride_qt, stride_qh)
    do_base = DO + _row0(seq, seq_start, head, stride_dob, stride_dot, stride_doh)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
    lse = tl.load(LSE + head * stride_lh + seq_start + offs_m, mask=offs_m < seqlen, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + seq_start + offs_m, mask=offs_m < seqlen, other=0.0)
    k_base = K + _row0(seq, seq_start, head, stride_kb, stride_kt, stride_kh)
    v_base = V + _row0(seq, seq_start, head, stride_vb, stride_vt, stride_vh)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # keys after this query block are never seen: stop at the diagonal
        end = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        end = seqlen
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        p = tl.exp2(s - lse[:, None])
        visible = offs_n[None, :] < seqlen
        if CAUSAL:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq)
    dq *= sm_scale
    dq_base = DQ + _row0(seq, seq_start, head, stride_dqb, stride_dqt, stride_dqh)
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

LOG2_E = math.log2(math.e)   # scores are kept in base 2: the kernels take sm_scale * LOG2_E as qk_scale
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def launch_config(head_dim: int, dtype: torch.dtype, shared_memory: int) -> dict:
    """Per kernel, block sizes, warps and stages for the device's shared memory per block, head dim and
    dtype (never the sequence length, so a new length never re-tunes or recompiles).

    fwd: BLOCK_M queries x BLOCK_N keys (BLOCK_N divides BLOCK_M; the backward preprocess uses its
    BLOCK_M). dkdv: BLOCK_N keys owned, BLOCK_M queries streamed; dq: BLOCK_M queries owned, BLOCK_N keys
    streamed. All blocks are >= 16, the smallest tl.dot operand a GPU accepts. Chosen with
    `bench/attention.py --compile-only ARCH`, which compiles every variant as the runtime does and prints
    shared memory, registers and spills:
    - 8 warps for the 128-row tiles of half precision and for the fp32 dK/dV: with 4, a thread needs
      more than 255 registers and spills (D=64: fwd and dK/dV on sm_86, dK/dV on sm_90); but 4 for the
      fp32 forward, which spilled 12 B at 8 warps (D > 64, sm_80);
    - half-precision dK/dV over 64 keys, not 128, at head dims > 64: its two fp32 accumulators and the
      K, V tiles of 128 keys spilled 64 B per thread on sm_86;
    - fp32 tiles take twice the bytes: at head dims > 64 the backward blocks of 64 rows need 115 KB,
      over the 99 KiB of sm_86 / sm_89 (A10G, L4), so devices with under 128 KiB per block get 32 rows.
    The resulting figures per variant are in BENCHMARKS.md.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = block_d > 64
    if dtype == torch.float32:
        rows = 32 if wide and shared_memory < 128 * 1024 else 64
        return dict(BLOCK_D=block_d,
                    fwd=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                    dkdv=dict(BLOCK_M=32, BLOCK_N=rows, num_warps=8, num_stages=2),
                    dq=dict(BLOCK_M=rows, BLOCK_N=32, num_warps=8 if wide else 4, num_stages=2))
    return dict(BLOCK_D=block_d,
                fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                dkdv=dict(BLOCK_M=32, BLOCK_N=64 if wide else 128, num_warps=8, num_stages=3),
                dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3))


def _row_strides(x: torch.Tensor, dense: bool) -> tuple[int, int, int]:
    """(per-sequence, per-token, per-head) strides for the kernels' addressing.

    Row i of sequence b sits at b * stride_b + (cu_seqlens[b] + i) * stride_t. Packed input (total, H, D)
    has stride_b = 0. Dense (B, H, T, D) uses cu_seqlens = [0, T, 2T, ...], so its batch stride is what
    remains of x.stride(0) after the b * T token rows already counted: 0 for (B, T, H, D) storage.
    """
    if dense:
        seq_len = x.shape[2]
        return x.stride(0) - seq_len * x.stride(2), x.stride(2), x.stride(1)
    return 0, x.stride(0), x.stride(1)


def _head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with unit stride; anything else is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_rows(like: torch.Tensor, dense: bool) -> torch.Tensor:
    """Output buffer shaped like `like`; dense ones are stored (B, T, H, D) so the model's
    o.transpose(1, 2).reshape(B, T, H * D) is a free view."""
    if dense:
        b, h, t, d = like.shape
        return torch.empty(b, t, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


_WHERE = "kernels/flash_attention.py"


def _check_qkv(q, k, v, dense: bool) -> None:
    rank, layout = (4, "(B, H, T, D)") if dense else (3, "(total_tokens, H, D)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            raise ValueError(f"{_WHERE}: {name} must be {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in _TL_DTYPES:
            raise TypeError(f"{_WHERE}: {name}.dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{_WHERE}: q, k, v must have one shape (self-attention), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_WHERE}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"{_WHERE}: head dim must be in 16..128, got {q.shape[-1]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{_WHERE}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    runtime.check_device(_WHERE, q.device)


def _check_cu_seqlens(cu_seqlens, q) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        got = f"dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) \
            else type(cu_seqlens).__name__
        raise TypeError(f"{_WHERE}: cu_seqlens must be a 1-D int32 tensor of N + 1 offsets, got {got}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{_WHERE}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; "
                         "they must share a device")


def _dot_dtype(dtype: torch.dtype):
    # The interpreter's tl.dot multiplies raw bf16 bit patterns (numpy has no bf16): compute in fp32 there.
    if dtype == torch.bfloat16 and runtime.interpreted():
        return tl.float32
    return _TL_DTYPES[dtype]


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, dense):
    """Launch the forward kernel. Returns O (q's shape) and the base-2 LSE, (H, total) fp32."""
    heads, head_dim = q.shape[1], q.shape[-1]  # H sits at dim 1 of both (B, H, T, D) and (total, H, D)
    num_seqs = cu_seqlens.numel() - 1
    total = q.shape[0] * q.shape[2] if dense else q.shape[0]
    cfg = launch_config(head_dim, q.dtype, runtime.shared_memory())
    o = _empty_rows(q, dense)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(max_seqlen, cfg["fwd"]["BLOCK_M"]), heads, num_seqs)
    _fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens,
        *_row_strides(q, dense), *_row_strides(k, dense), *_row_strides(v, dense), *_row_strides(o, dense),
        lse.stride(0),
        sm_scale * LOG2_E,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], DOT_DTYPE=_dot_dtype(q.dtype), **cfg["fwd"],
    )
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, sm_scale, dense):
    """Launch preprocess, dK/dV and dQ kernels. Returns dq, dk, dv in the inputs' shapes."""
    heads, head_dim = lse.shape[0], q.shape[-1]
    num_seqs = cu_seqlens.numel() - 1
    cfg = launch_config(head_dim, q.dtype, runtime.shared_memory())
    do = _head_dim_contiguous(do)
    dq, dk, dv = (_empty_rows(x, dense) for x in (q, k, v))
    delta = torch.empty_like(lse)
    q_s, k_s, v_s, o_s, do_s = (_row_strides(x, dense) for x in (q, k, v, o, do))
    dot_dtype = _dot_dtype(q.dtype)
    common = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], DOT_DTYPE=dot_dtype)
    qk_scale = sm_scale * LOG2_E

    _bwd_preprocess_kernel[(triton.cdiv(max_seqlen, cfg["fwd"]["BLOCK_M"]), heads, num_seqs)](
        o, do, delta, cu_seqlens, *o_s, *do_s, delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_M=cfg["fwd"]["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
    )
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg["dkdv"]["BLOCK_N"]), heads, num_seqs)](
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, *q_s, *k_s, *v_s, *do_s,
        *_row_strides(dk, dense), *_row_strides(dv, dense), lse.stride(0),
        sm_scale, qk_scale,
        **common, **cfg["dkdv"],
    )
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg["dq"]["BLOCK_M"]), heads, num_seqs)](
        q, k, v, do, dq, lse, delta, cu_seqlens, *q_s, *k_s, *v_s, *do_s, *_row_strides(dq, dense), lse.stride(0),
        sm_scale, qk_scale,
        **common, **cfg["dq"],
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Autograd and the public API
# ---------------------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, dense):
        with runtime.on_device(q):
            o, lse = _forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, dense)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.args = (max_seqlen, causal, sm_scale, dense)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        with runtime.on_device(q):
            dq, dk, dv = _backward(do, q, k, v, o, lse, cu_seqlens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q, k, v, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """Attention over (B, H, T, D) tensors; returns (B, H, T, D), differentiable in q, k, v.

    sm_scale defaults to 1 / sqrt(D). Runs the varlen kernels with B sequences of length T.
    """
    _check_qkv(q, k, v, dense=True)
    batch, _, seq_len, head_dim = q.shape
    if seq_len < 1:
        raise ValueError(f"{_WHERE}: sequence length must be >= 1, got q.shape {tuple(q.shape)}")
    cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=q.device)
    q, k, v = (_head_dim_contiguous(x) for x in (q, k, v))
    scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
    return _FlashAttention.apply(q, k, v, cu_seqlens, seq_len, bool(causal), scale, True)


def flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = True,
                           sm_scale: float | None = None) -> torch.Tensor:
    """Attention over packed sequences (total_tokens, H, D); returns (total_tokens, H, D), differentiable.

    cu_seqlens: (N + 1,) int32 offsets, cu_seqlens[0] = 0, cu_seqlens[-1] = total_tokens; sequence i is
    rows cu_seqlens[i]:cu_seqlens[i+1] and never attends across its ends. max_seqlen must be >= the
    longest sequence (it sizes the grid; rows beyond it would not be computed). sm_scale defaults to
    1 / sqrt(D).
    """
    _check_qkv(q, k, v, dense=False)
    _check_cu_seqlens(cu_seqlens, q)
    if int(max_seqlen) < 1:
        raise ValueError(f"{_WHERE}: max_seqlen must be >= 1 (the longest sequence), got {max_seqlen}")
    q, k, v = (_head_dim_contiguous(x) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _FlashAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale, False)
