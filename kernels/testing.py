"""What the kernel tests and the benchmarks' correctness checks share: the comparison of a kernel's tensor
with its fp32 reference, the GPU's tolerances for it, and attention's outputs and gradients side by side.

    from slm.kernels import testing
    testing.difference("dq", q.grad, q_ref.grad, atol=2e-2, rtol=2e-2)   # [] or one message
    testing.assert_close("dq", q.grad, q_ref.grad, atol=2e-2, rtol=2e-2)
    atol, rtol = testing.GPU_TOLERANCES[torch.bfloat16]

Within tolerance means |actual - expected| <= atol + rtol * |expected| everywhere (a NaN never is).
"""

import torch

# A GPU runs fp32 dots as tf32 (10 mantissa bits) and rounds attention's P and dS, and the logits, to 16
# bits before the half-precision dots: (atol, rtol) by input dtype, for every op.
GPU_TOLERANCES = {torch.float32: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def difference(name, actual, expected, atol, rtol) -> list[str]:
    """[] when actual is within atol + rtol * |expected| of expected everywhere, else one message with the
    number of elements off and the max and mean difference."""
    if actual is None:
        return [f"{name}: no gradient (the reference has one)"]
    if actual.shape != expected.shape:
        return [f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"]
    actual, expected = actual.float(), expected.float()
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())     # NaN counts as bad
    if not bad.any():
        return []
    return [f"{name}: {int(bad.sum())}/{diff.numel()} elements off; max diff {diff.max().item():.3e}, "
            f"mean diff {diff.mean().item():.3e} (atol {atol}, rtol {rtol})"]


def assert_close(name, actual, expected, atol, rtol):
    """`difference` as an assertion, for tests."""
    failures = difference(name, actual, expected, atol, rtol)
    assert not failures, failures[0]


def outputs_and_gradients(kernel_fn, reference_fn, inputs) -> dict:
    """{"out"|"dq"|"dk"|"dv": (kernel's, fp32 reference's)} for q, k, v = `inputs`, both backpropagating
    the same random upstream gradient."""
    q, k, v = (x.clone().requires_grad_() for x in inputs)
    out = kernel_fn(q, k, v)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in inputs)
    ref = reference_fn(q32, k32, v32)
    ref.backward(grad_out.float())
    return {"out": (out, ref), "dq": (q.grad, q32.grad), "dk": (k.grad, k32.grad), "dv": (v.grad, v32.grad)}
