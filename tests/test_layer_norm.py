"""Tests for kernels/layer_norm.py against kernels/reference.py's layer_norm_reference, through Triton's
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

    pytest tests/test_layer_norm.py

The output and the gradients of x, residual, weight and bias are compared with the fp32 reference on
the same values, on awkward shapes: row counts that the backward's programs do not split evenly, one
row, widths 64 / 80 (not a power of two) / 1024 (OPT-350M's) / 8192 (the widest), no residual, no
affine, weight without bias, mixed dtypes (half x with an fp32 residual, as under autocast), and a
non-contiguous x. Also the input errors.
"""

import pytest
import torch

from slm.kernels.layer_norm import MAX_WIDTH, layer_norm
from slm.kernels.reference import layer_norm_reference
from slm.kernels.testing import TOLERANCES, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) by dtype against the fp32 reference for the output and every gradient (kernels/testing.py's
# table for this device). Half precision pays for rounding x + residual and the output to 11 (fp16) or 8
# (bf16) mantissa bits: the output is O(1), so one rounding of y costs ~5e-4 / 4e-3 and of z (|z| up to
# ~5 sigma) a few times that.
TOLERANCE = TOLERANCES[DEVICE]
FP32 = TOLERANCE[torch.float32]


def make_inputs(shape, dtype, residual_dtype=None, weight=True, bias=True, seed=0):
    """x, residual (or None), weight, bias (or None) with values like a post-LN block's: x ~ N(1, 2),
    so the mean is not zero and the variance not one, and affine parameters away from (1, 0)."""
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    residual = None if residual_dtype is None else torch.randn(shape, generator=gen).to(residual_dtype)
    w = (1 + 0.5 * torch.randn(width, generator=gen)) if weight else None
    b = 0.5 * torch.randn(width, generator=gen) if bias else None
    return [None if t is None else t.to(DEVICE) for t in (x, residual, w, b)]


def check(shape, dtype, atol, rtol, residual_dtype="same", weight=True, bias=True, eps=1e-5):
    """Run the kernel and the fp32 reference on the same values with the same upstream gradient; compare
    the output and the gradient of every input."""
    residual_dtype = dtype if residual_dtype == "same" else residual_dtype
    inputs = make_inputs(shape, dtype, residual_dtype, weight, bias)
    names = ["x", "residual", "weight", "bias"]
    ours = [None if t is None else t.clone().requires_grad_() for t in inputs]
    ref = [None if t is None else t.detach().float().requires_grad_() for t in inputs]

    y = layer_norm(ours[0], ours[2], ours[3], eps, residual=ours[1])
    expected_dtype = dtype if residual_dtype is None else torch.promote_types(dtype, residual_dtype)
    assert y.dtype == expected_dtype and y.shape == inputs[0].shape
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(DEVICE)
    y.backward(grad_out)
    y_ref = layer_norm_reference(ref[0], ref[2], ref[3], eps, residual=ref[1])
    y_ref.backward(grad_out.float())

    assert_close("y", y, y_ref, atol, rtol)
    for name, t, t_ref in zip(names, ours, ref):
        if t is not None:
            assert t.grad.dtype == t.dtype, f"d{name} is {t.grad.dtype}, expected {name}'s dtype {t.dtype}"
            assert_close(f"d{name}", t.grad, t_ref.grad, atol, rtol)


# (shape, kwargs): rows 37 split 10/10/10/7 over the interpreter's 4 backward programs; one row; widths
# 64, 80 (masked to a 128 block), 1024 and the widest; batched (..., N) input; each optional input absent.
CASES = [
    ((37, 64), {}),
    ((1, 1024), {}),
    ((2, 5, 80), {}),
    ((3, 1024), dict(residual_dtype=None)),
    ((4, 80), dict(weight=False, bias=False)),
    ((6, 64), dict(bias=False)),
]


@pytest.mark.parametrize("dtype, atol, rtol", [(dtype, *tol) for dtype, tol in TOLERANCE.items()],
                         ids=[str(d).removeprefix("torch.") for d in TOLERANCE])
@pytest.mark.parametrize("shape, kwargs", CASES, ids=[f"{'x'.join(map(str, s))}-{'-'.join(k) or 'all'}"
                                                       for s, k in CASES])
def test_matches_reference(shape, kwargs, dtype, atol, rtol):
    check(shape, dtype, atol, rtol, **kwargs)


def test_widest_row():
    """N = 8192: one 8192-wide block per row, the most the kernel takes."""
    check((2, MAX_WIDTH), torch.float32, *FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_fp32_residual(dtype):
    """Under autocast a post-LN block adds a half sublayer output to an fp32 residual stream: the sum,
    the output and dresidual are fp32, dx keeps x's half dtype."""
    check((5, 80), dtype, *TOLERANCE[dtype], residual_dtype=torch.float32)


@pytest.mark.parametrize("view", [lambda t: t[:, :64], lambda t: t[:, ::2]], ids=["row-strided", "column-strided"])
def test_strided_inputs(view):
    """Views of a wider buffer: a row stride of 128 is passed to the kernels; a column stride of 2 is
    copied once. The gradient reaches the buffer through the view."""
    x_wide, residual_wide, _, _ = make_inputs((7, 128), torch.float32, residual_dtype=torch.float32)
    _, _, weight, bias = make_inputs((64,), torch.float32)
    ours, ref = x_wide.clone().requires_grad_(), x_wide.clone().requires_grad_()
    y = layer_norm(view(ours), weight, bias, 1e-5, residual=view(residual_wide))
    y_ref = layer_norm_reference(view(ref), weight, bias, 1e-5, residual=view(residual_wide))
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    assert_close("y", y, y_ref, *FP32)
    assert_close("dx", ours.grad, ref.grad, *FP32)


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(2, MAX_WIDTH + 1)), "1 <= N <= 8192"),
    (dict(residual=torch.zeros(3, 64)), "residual must have x's shape"),
    (dict(weight=torch.ones(80)), "weight must be (64,)"),
    (dict(x=torch.zeros(2, 64, dtype=torch.float64)), "x.dtype must be"),
])
def test_input_errors(bad, message):
    args = dict(x=torch.zeros(2, 64), weight=torch.ones(64), bias=torch.zeros(64), residual=None) | bad
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        layer_norm(args["x"], args["weight"], args["bias"], 1e-5, residual=args["residual"])
