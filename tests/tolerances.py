"""Comparing a kernel's tensor with its fp32 reference within a tolerance, for the kernel tests.

    from tolerances import assert_close
    assert_close("dq", q.grad, q_ref.grad, atol=2e-2, rtol=2e-2)
"""


def assert_close(name, actual, expected, atol, rtol):
    """All elements within atol + rtol * |expected|, else a message with the max and mean difference."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual, expected = actual.float(), expected.float()
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{diff.numel()} elements off; max diff {diff.max().item():.3e}, "
        f"mean diff {diff.mean().item():.3e} (atol {atol}, rtol {rtol})"
    )
