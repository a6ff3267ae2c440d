"""Tests for kernels/linear_cross_entropy.py against kernels/reference.py's linear_cross_entropy_reference
(materialised fp32 logits), through Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).

    pytest tests/test_linear_cross_entropy.py

The loss and the gradients of hidden and of the (tied) weight are compared with the fp32 reference on the
same values: several chunks with a ragged last one, one token, OPT's 50,272 vocabulary (not a power of
two: a masked last block) at a handful of tokens, partly and wholly ignored targets, another ignore_index,
every reduction, a frozen weight, autocast, and a backward run twice. Also the chunk-size bound and the
input errors. A 50,272-entry row costs ~0.1 s in the interpreter, so those cases keep to 5 tokens.
"""

import pytest
import torch

from slm.kernels.linear_cross_entropy import chunk_size, linear_cross_entropy
from slm.kernels.reference import linear_cross_entropy_reference
from slm.kernels.testing import OPT_VOCAB, TOLERANCES, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) by dtype against the fp32 reference, for the loss and both gradients (kernels/testing.py's
# table for this device). Half precision rounds the inputs' product to 11 / 8 bits in the logits (|logit| ~ 3
# here, so ~2e-3 / 1e-2 each), then the gradient of the logits before the two backward GEMMs; the summed
# loss over ~40 tokens adds up the logit errors.
TOLERANCE = TOLERANCES[DEVICE]
FP32 = TOLERANCE[torch.float32]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in TOLERANCE]


def make_inputs(tokens, width, vocab, dtype, ignored=(), ignore_index=-100, seed=0):
    """hidden (N, E) ~ N(0, 1), weight (V, E) ~ N(0, 1/E) so logits are O(1), targets with `ignored` rows
    set to ignore_index."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) * width ** -0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[list(ignored)] = ignore_index
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def check(tokens, width, vocab, dtype, atol, rtol, ignored=(), ignore_index=-100, reduction="sum",
          train_weight=True):
    """Kernel and fp32 reference on the same values and upstream gradient: compare loss, dhidden, dweight."""
    hidden, weight, targets = make_inputs(tokens, width, vocab, dtype, ignored, ignore_index)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_(train_weight)

    loss = linear_cross_entropy(h, w, targets, ignore_index=ignore_index, reduction=reduction)
    loss_ref = linear_cross_entropy_reference(h_ref, w_ref, targets, ignore_index=ignore_index, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    loss.backward(grad_out)
    loss_ref.backward(grad_out)

    assert_close("loss", loss, loss_ref, atol, rtol)
    assert h.grad.dtype == dtype, f"dhidden is {h.grad.dtype}, expected {dtype}"
    assert_close("dhidden", h.grad, h_ref.grad, atol, rtol)
    if train_weight:
        assert w.grad.dtype == dtype, f"dweight is {w.grad.dtype}, expected {dtype}"
        assert_close("dweight", w.grad, w_ref.grad, atol, rtol)
    else:
        assert w.grad is None


# (tokens, width, vocab, kwargs). 37 tokens at E=64, V=1,000 run as 10 chunks of 4 (chunk_size), the
# last one ragged; V=1,000 is one masked 1,024 block; ignored rows inside chunks and at both ends.
CASES = [
    (37, 64, 1000, dict(ignored=(0, 5, 36))),
    (37, 80, 1000, dict(ignored=(3,), reduction="mean")),
    (37, 64, 1000, dict(ignored=(2, 17), reduction="none")),
    (1, 64, 1000, dict(reduction="mean")),
    (5, 64, OPT_VOCAB, dict(ignored=(1, 3))),
    (3, 64, OPT_VOCAB, dict(reduction="none")),
]


@pytest.mark.parametrize("dtype, atol, rtol", [(dtype, *tol) for dtype, tol in TOLERANCE.items()], ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens, width, vocab, kwargs", CASES,
                         ids=[f"N{n}-E{e}-V{v}-{k.get('reduction', 'sum')}" for n, e, v, k in CASES])
def test_matches_reference(tokens, width, vocab, kwargs, dtype, atol, rtol):
    check(tokens, width, vocab, dtype, atol, rtol, **kwargs)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_targets_ignored(reduction):
    """Nothing to train: loss 0 (NaN for "mean", 0 / 0, as torch's cross_entropy) and zero gradients."""
    hidden, weight, targets = make_inputs(6, 64, 131, torch.float32, ignored=range(6))
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = linear_cross_entropy(h, w, targets, reduction=reduction)
    expected = linear_cross_entropy_reference(hidden.detach(), weight.detach(), targets, reduction=reduction)
    assert torch.equal(loss.isnan(), expected.isnan()) and torch.equal(loss.nan_to_num(), expected.nan_to_num())
    loss.sum().backward()
    assert not h.grad.any() and not w.grad.any()


def test_other_ignore_index_and_frozen_weight():
    """ignore_index=0 ignores target id 0 (the pad id of some tokenizers); a frozen head gets no gradient."""
    check(9, 64, 131, torch.float32, *FP32, ignored=(4, 8), ignore_index=0, train_weight=False)


def test_autocast_computes_in_half_and_returns_fp32_gradients():
    """Under autocast the GEMMs run in autocast's dtype, as in the model's fp16/bf16 training; fp32
    parameters still get fp32 gradients."""
    hidden, weight, targets = make_inputs(9, 64, 131, torch.float32, ignored=(2,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    half = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    with torch.autocast(DEVICE, dtype=half):
        loss = linear_cross_entropy(h, w, targets)
        loss_ref = linear_cross_entropy_reference(h_ref, w_ref, targets)
    loss.backward()
    loss_ref.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    for name, actual, expected in (("loss", loss, loss_ref), ("dhidden", h.grad, h_ref.grad),
                                   ("dweight", w.grad, w_ref.grad)):
        assert_close(name, actual, expected, *TOLERANCE[half])


def test_backward_twice_with_retained_graph():
    """The saved gradients are scaled out of place, so a retained graph gives the same gradients again."""
    hidden, weight, targets = make_inputs(9, 64, 131, torch.float32)
    h = hidden.requires_grad_()
    loss = linear_cross_entropy(h, weight, targets, reduction="mean")
    (2 * loss).backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    (2 * loss).backward()
    assert torch.equal(h.grad, first)


def test_no_grad_forward_matches():
    """Evaluation (no gradient wanted) computes losses only, and the same ones."""
    hidden, weight, targets = make_inputs(9, 64, 131, torch.float32, ignored=(0,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, reduction="none")
    assert_close("loss", loss, linear_cross_entropy_reference(hidden, weight, targets, reduction="none"), *FP32)


@pytest.mark.parametrize("tokens, width", [(16384, 1024), (8 * 2048, 512), (1000, 1024), (37, 64), (1, 1024)])
def test_chunk_logits_stay_near_the_size_of_hidden(tokens, width):
    """A chunk's logits hold C x V < 2 x (N x E + V) values: about twice the hidden states, never N x V."""
    rows = chunk_size(tokens, OPT_VOCAB, width)
    assert rows * OPT_VOCAB < 2 * (tokens * width + OPT_VOCAB), (rows, tokens, width)


@pytest.mark.parametrize("change, message", [
    (dict(targets=torch.tensor([0, 131, -100])), r"targets must be in \[0, 131\)"),
    (dict(targets=torch.tensor([0, 1, 2], dtype=torch.int32)), "int64"),
    (dict(weight=torch.zeros(131, 80)), "one E"),
    (dict(reduction="max"), "reduction must be one of"),
    (dict(weight=torch.zeros(131, 64, dtype=torch.float16)), "must share a dtype"),
])
def test_input_errors(change, message):
    args = dict(hidden=torch.zeros(3, 64), weight=torch.zeros(131, 64), targets=torch.tensor([0, 1, 2]),
                reduction="sum") | change
    with pytest.raises((ValueError, TypeError), match=message):
        linear_cross_entropy(args["hidden"], args["weight"], args["targets"], reduction=args["reduction"])
