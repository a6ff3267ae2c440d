"""Fused residual-add + LayerNorm in Triton, forward and backward.

    z = x + residual                        (residual optional; OPT-350M is post-LN: norm(h + sublayer(h)))
    y = (z - mean(z)) * rstd * w + b,       rstd = 1 / sqrt(var(z) + eps), over the last dim of width N

Forward: one program per row. The whole row (N <= 8192, padded to BLOCK_N = next power of two with a
mask) sits in registers, so the add, mean, variance and affine map read x and residual once and write y
once; mean and rstd (fp32) are saved per row, and so is z when there is a residual (the backward needs
the normalised input, and storing z costs one row write instead of reading both inputs again).

Backward, with xhat = (z - mean) * rstd and g = w * dy (g = dy without weight):
    dz = rstd * (g - xhat * mean(g * xhat) - mean(g))       -> dx = dz, dresidual = dz
    dw = sum over rows of dy * xhat,    db = sum over rows of dy
dz is per row; dw and db are sums over all rows. Each program walks a contiguous range of rows,
accumulating its own dw/db partial sums in fp32 registers, and writes one (N,) partial per program;
torch sums the (programs, N) partials afterwards. There are as many programs as SMs, so the partials
are small and no atomics (non-deterministic, no bf16) are needed.

Precision: statistics and all arithmetic in fp32; z is rounded to the dtype `x + residual` has in torch
before the statistics, as the unfused model computes it; y is stored in that dtype too (x's own when x
and residual agree, as in kernels/reference.py's layer_norm_reference), dx in x's dtype, dresidual in
residual's dtype, dw/db in the parameters' dtypes. Inputs fp32, fp16, bf16 (weight and bias
may differ from x, e.g. fp32 parameters under autocast); x's last dim is made unit-stride if it is not.

References: Ba et al., "Layer Normalization" (arXiv:1607.06450); Triton's layer-norm tutorial
(05-layer-norm.py) for the backward formula and the partial dw/db sums; Liger-Kernel's
ops/layer_norm.py for one block of rows per SM; flash-attn's ops/triton/layer_norm.py for the fused
residual add.

    from slm.kernels.layer_norm import layer_norm
    y = layer_norm(x, weight, bias, eps=1e-5, residual=r)       # LayerNorm(x + r), x's shape

Tests: `pytest tests/test_layer_norm.py` (CPU through TRITON_INTERPRET=1, see kernels/interpreter_fix.py).
Shared memory, registers and spills of every variant on an A10G or H100, without one:
`python -m slm.kernels.compile_check 86 --ops layer_norm` (kernels/compile_check.py).
"""

import torch
import triton
import triton.language as tl

from slm.kernels import runtime

# One row per program, held in registers: at 8192 the fp32 backward uses 110 registers a thread on sm_86 and
# 117 on sm_90, without spills (`python -m slm.kernels.compile_check 90 --ops layer_norm`). Wider rows would
# need a kernel that loops over column blocks.
MAX_WIDTH = 8192

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input rows
    R,  # (M, N) residual rows (unused without HAS_RESIDUAL)
    Z,  # (M, N) out: x + residual, saved for the backward (unused without HAS_RESIDUAL)
    W,  # (N,) weight (unused without HAS_WEIGHT)
    B,  # (N,) bias (unused without HAS_BIAS)
    Y,  # (M, N) out: normalised rows, in the dtype of x + residual
    MEAN,  # (M,) fp32 out
    RSTD,  # (M,) fp32 out
    stride_x,  # row strides; every last dim is unit-stride
    stride_r,
    stride_z,
    stride_y,
    N,  # row width
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    # 64-bit row offsets: rows x width can pass 2**31 elements on large batches.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    z = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        z += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to its storage dtype before the statistics, so the backward's xhat (from the
        # stored z) is exactly the forward's, and the result equals torch's `x + residual` then norm.
        z = z.to(Z.dtype.element_ty)
        tl.store(Z + row * stride_z + cols, z, mask=mask)
        z = z.to(tl.float32)

    # Two-pass statistics (mean, then variance of the centred row): as cheap as one pass here, since the
    # row is already in registers, and free of the cancellation of E[z^2] - E[z]^2.
    mean = tl.sum(z, axis=0) / N
    centred = tl.where(mask, z - mean, 0.0)  # padded columns must not add (0 - mean)^2 to the variance
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)

    y = centred * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient
    Z,  # (M, N) normalised input: x + residual as stored by the forward, or x itself
    W,  # (N,) weight (unused without HAS_WEIGHT)
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    DX,  # (M, N) out: gradient of x, x's dtype
    DR,  # (M, N) out: gradient of residual, residual's dtype (unused without HAS_RESIDUAL)
    DW_PARTIAL,  # (programs, N) fp32 out: this program's sum of dy * xhat (unused without HAS_WEIGHT)
    DB_PARTIAL,  # (programs, N) fp32 out: this program's sum of dy (unused without HAS_BIAS)
    stride_dy,  # row strides; every last dim is unit-stride
    stride_z,
    stride_dx,
    stride_dr,
    M,  # number of rows
    N,  # row width
    rows_per_program,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # loaded once for all this program's rows
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Row pointers start in 64 bits (rows x width can pass 2**31) and advance one row per iteration.
    first = row_start.to(tl.int64)
    dy_row = DY + first * stride_dy
    z_row = Z + first * stride_z
    dx_row = DX + first * stride_dx
    dr_row = DR + first * stride_dr
    for row in range(row_start, row_end):
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (z - mean) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        # d/dz of LayerNorm: the two means are the gradient's components along xhat and along the
        # all-ones direction, which the normalisation removes.
        c1 = tl.sum(xhat * g, axis=0) / N
        c2 = tl.sum(g, axis=0) / N
        dz = (g - (xhat * c1 + c2)) * rstd
        tl.store(dx_row + cols, dz.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(dr_row + cols, dz.to(DR.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        dy_row += stride_dy
        z_row += stride_z
        dx_row += stride_dx
        dr_row += stride_dr

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

_WHERE = "kernels/layer_norm.py"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def launch_config(width: int) -> dict:
    """Block and warps for a row of `width`, as in Liger's calculate_settings: the row is one block, and
    wider blocks get more warps so each thread holds at most ~16 fp32 values per row vector."""
    block_n = triton.next_power_of_2(width)
    num_warps = 4 if block_n < 2048 else 8 if block_n < 4096 else 16
    return dict(BLOCK_N=block_n, num_warps=num_warps)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., N) -> (M, N) with a unit-stride last dim (a view when possible, else one copy)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x, weight, bias, residual) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{_WHERE}: x.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"{_WHERE}: x must be (..., N) with 1 <= N <= {MAX_WIDTH}, got shape {tuple(x.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{_WHERE}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype not in _DTYPES:
            raise TypeError(f"{_WHERE}: residual.dtype must be float32, float16 or bfloat16, got {residual.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"{_WHERE}: {name} must be ({x.shape[-1]},) to match x's last dim, "
                             f"got {tuple(p.shape)}")
    devices = {t.device for t in (x, weight, bias, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{_WHERE}: x, weight, bias and residual must be on one device, "
                         f"got {sorted(map(str, devices))}")
    runtime.check_device(_WHERE, x.device)


def _forward(x, weight, bias, residual, eps):
    """The forward launcher: x, residual (M, N) on the current device (or meta tensors, for
    kernels/compile_check.py). Returns y (M, N), the normalised input z (x itself without residual), mean, rstd."""
    rows, width = x.shape
    cfg = launch_config(width)
    z = x if residual is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                                               device=x.device)
    y = torch.empty(x.shape, dtype=z.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    r = x if residual is None else residual  # placeholders for unused pointers are never read
    _layer_norm_fwd_kernel[(rows,)](
        x, r, z,
        x if weight is None else weight,
        x if bias is None else bias,
        y, mean, rstd,
        x.stride(0), r.stride(0), z.stride(0), y.stride(0),
        width, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return y, z, mean, rstd


def _backward(dy, z, weight, bias, mean, rstd, x_dtype, residual_dtype):
    """The backward launcher: dy, z (M, N). Returns dx, dresidual (None without residual), dweight, dbias
    (None when absent)."""
    rows, width = z.shape
    cfg = launch_config(width)
    programs = min(rows, runtime.multiprocessor_count())  # one per SM: each sums its rows' dw/db once
    dx = torch.empty(z.shape, dtype=x_dtype, device=z.device)
    dr = None if residual_dtype is None else torch.empty(z.shape, dtype=residual_dtype, device=z.device)
    dw_partial = None if weight is None else torch.empty(programs, width, dtype=torch.float32, device=z.device)
    db_partial = None if bias is None else torch.empty(programs, width, dtype=torch.float32, device=z.device)
    _layer_norm_bwd_kernel[(programs,)](
        dy, z,
        z if weight is None else weight,
        mean, rstd, dx,
        dx if dr is None else dr,
        dx if dw_partial is None else dw_partial,
        dx if db_partial is None else db_partial,
        dy.stride(0), z.stride(0), dx.stride(0), dx.stride(0) if dr is None else dr.stride(0),
        rows, width, triton.cdiv(rows, programs),
        HAS_RESIDUAL=dr is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    dw = None if weight is None else dw_partial.sum(0).to(weight.dtype)
    db = None if bias is None else db_partial.sum(0).to(bias.dtype)
    return dx, dr, dw, db


# ---------------------------------------------------------------------------------------------------
# Autograd and the public API
# ---------------------------------------------------------------------------------------------------


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        with runtime.on_device(x):
            y, z, mean, rstd = _forward(x, weight, bias, residual, eps)
        ctx.save_for_backward(z, weight, bias, mean, rstd)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, weight, bias, mean, rstd = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        with runtime.on_device(z):
            dx, dr, dw, db = _backward(dy, z, weight, bias, mean, rstd, *ctx.dtypes)
        return dx, dw, db, dr, None


def layer_norm(x, weight, bias, eps: float, residual=None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim; x's shape, the dtype of x + residual, differentiable in all inputs.

    x, residual (..., N) with N <= 8192; weight, bias (N,) or None (no scale / no shift).
    """
    _check(x, weight, bias, residual)
    shape, width = x.shape, x.shape[-1]
    x2 = _rows(x, width)
    r2 = None if residual is None else _rows(residual, width)
    weight, bias = (None if p is None else p.contiguous() for p in (weight, bias))
    return _LayerNorm.apply(x2, weight, bias, r2, float(eps)).view(shape)
