"""The kernel registry (kernels/registry.py) and its attention implementations (kernels/attention.py).

    pytest tests/test_registry.py

Each op's implementations against one another at small shapes runs in tests/test_kernel_conformance.py;
here: the table itself, and that the three attention implementations compute one function of every
form the model calls (dense causal, masked, a decode step against longer keys, packed rows).
"""

import pytest
import torch

from slm import kernels
from slm.kernels.testing import TOLERANCES


def test_shipped_implementations_are_listed_and_the_references_among_them():
    shipped = kernels.available()
    assert {"eager", "sdpa", "triton"} <= set(shipped["attention"])
    assert "torch" in shipped["layer_norm"] and "torch" in shipped["linear_cross_entropy"]
    for op, name in kernels.REFERENCE.items():
        assert name in shipped[op]
    assert kernels.get("layer_norm", "torch") is kernels.layer_norm_reference


def test_register_adds_a_name_and_get_returns_it(kernel_registry):
    def mine(*args, **kwargs):
        return kernels.get("attention", "eager")(*args, **kwargs)

    kernels.register("attention", "mine", mine)
    assert kernels.get("attention", "mine") is mine
    assert "mine" in kernels.available()["attention"]
    kernels.available()["attention"].append("not-registered")   # a copy: the table stays as it is
    assert "not-registered" not in kernels.available()["attention"]


@pytest.mark.parametrize("op, name, said", [
    ("attention", "flash3", "attention implementation 'flash3'"),
    ("rms_norm", "torch", "op 'rms_norm'"),
])
def test_an_unknown_op_or_name_is_one_error_listing_what_exists(op, name, said):
    with pytest.raises(ValueError) as err:
        kernels.get(op, name)
    message = str(err.value)
    assert said in message
    assert "attention: eager, sdpa, triton" in message and "layer_norm: torch" in message


def test_register_refuses_an_unknown_op_and_a_non_function():
    with pytest.raises(ValueError, match="unknown op 'rms_norm'"):
        kernels.register("rms_norm", "mine", lambda x: x)
    with pytest.raises(TypeError, match="expected a function"):
        kernels.register("attention", "mine", "eager")
    assert "mine" not in kernels.available()["attention"]


# ---------------------------------------------------------------------------------- attention forms

# On a GPU the kernels run there (the interpreter only on CPU); Triton's fp32 tl.dot is TF32 on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL, RTOL = TOLERANCES[DEVICE][torch.float32]


def _qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(DEVICE) for _ in range(3)]


def _padded_mask(b, t_q, t_k):
    """(B, 1, Tq, Tk): row 1 has two left pads, which (as in the model) see only themselves, so that no
    query has every key masked (a row whose softmax each implementation may fill differently)."""
    causal = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
    real = torch.ones(b, t_k, dtype=torch.bool)
    real[1, :2] = False
    itself = torch.arange(t_k)[None, :] == torch.arange(t_k - t_q, t_k)[:, None]     # (Tq, Tk)
    return (causal & (real[:, None, None, :] | itself)).to(DEVICE)


FORMS = {
    "dense causal": lambda: (_qkv(2, 3, 9, 16), {}),
    "not causal": lambda: (_qkv(2, 3, 9, 16), {"causal": False}),
    "masked prefill": lambda: (_qkv(2, 3, 9, 16), {"mask": _padded_mask(2, 9, 9), "causal": False}),
    "decode step": lambda: ([*_qkv(2, 3, 1, 16)[:1], *_qkv(2, 3, 7, 16, seed=1)[1:]], {}),
    "scaled": lambda: (_qkv(1, 2, 5, 16), {"scale": 0.3}),
    "packed": lambda: (_qkv(12, 3, 16), {"cu_seqlens": torch.tensor([0, 5, 6, 12], dtype=torch.int32,
                                                                    device=DEVICE), "max_seqlen": 6}),
}


@pytest.mark.parametrize("name", ["sdpa", "triton"])
@pytest.mark.parametrize("form", FORMS)
def test_attention_implementations_agree_with_eager(name, form):
    (q, k, v), kwargs = FORMS[form]()
    expected = kernels.get("attention", "eager")(q, k, v, **kwargs)
    got = kernels.get("attention", name)(q, k, v, **kwargs)
    assert got.shape == q.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_eager_decode_step_is_bottom_right_causal():
    """A query appended after Tk - 1 cached keys sees all of them, as in decoding."""
    q, k, v = _qkv(1, 1, 1, 16)[0], *_qkv(1, 1, 4, 16, seed=1)[1:]
    out = kernels.get("attention", "eager")(q, k, v)
    full = torch.softmax((q @ k.transpose(-1, -2)) / 4.0, dim=-1) @ v
    torch.testing.assert_close(out, full)


def test_packed_rows_refuse_a_mask_and_triton_refuses_dropout():
    q, k, v = _qkv(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="take no mask"):
        kernels.get("attention", "sdpa")(q, k, v, cu_seqlens=cu, max_seqlen=4,
                                         mask=torch.ones(4, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="no attention dropout"):
        kernels.get("attention", "triton")(q, k, v, cu_seqlens=cu, max_seqlen=4, dropout_p=0.1)
