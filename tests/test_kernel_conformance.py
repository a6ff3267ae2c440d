"""Conformance suite: every registered implementation of every kernel op against the op's reference.

    pytest tests/test_kernel_conformance.py                                 # every op, every implementation
    pytest tests/test_kernel_conformance.py --kernel layer_norm=triton      # one implementation only
    TRITON_INTERPRET=1 pytest -p my_kernels tests/test_kernel_conformance.py --kernel attention=mine

Your own kernel: a module on PYTHONPATH (`my_kernels` above) that runs `from slm import kernels` and
`kernels.register(op, name, fn)` with fn taking the reference's signature (kernels/registry.py); `-p` imports
it before the tests are collected (and before conftest.py can choose Triton's interpreter, hence
TRITON_INTERPRET=1 on a CPU), `--kernel` (repeatable) picks it. From Python: `conformance_failures(op, name)`
returns the list of failed checks, empty when the implementation conforms. bench/op.py builds its inputs with
the case builders here and times the peers in PEERS.

Each case of an op (CASES) calls the implementation in the case's dtype and the reference
(kernels.REFERENCE) on the same values in fp32, backpropagates the same random upstream gradient through
both, and compares the output and the gradient of every floating input within that dtype's (atol, rtol)
(TOLERANCES): |actual - expected| <= atol + rtol * |expected|; a failure prints the max and mean
difference. The cases are the awkward ones: lengths that are not a multiple of a block, length 1, packed
sequences (cu_seqlens), decode shapes (Tq < Tk, with and without a mask), widths 64/80/1024, head dims
64/80, ignore_index (the default and another), the 50,272-entry OPT vocabulary at a handful of tokens.
An implementation that cannot do a case must say so: dropout (random, so not compared) passes either with
an error naming dropout (the Triton attention) or with an output that dropout visibly changed.

Tensors live on `DEVICE`: CUDA when present, else the CPU, where the Triton kernels run in Triton's
interpreter (tests/conftest.py) -- slow, so the shapes are small.
"""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from slm import kernels
from slm.kernels.testing import GPU_TOLERANCES, difference

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (atol, rtol) per device and dtype, for the output and every gradient against the fp32 reference.
# The inputs are the same values on both sides, so the error is the implementation's arithmetic alone:
# fp32 is summation order on a CPU (and in the interpreter, whose fp32 dots are exact), but tf32 dots on a
# GPU (10 mantissa bits); half precision pays for rounding intermediates (attention's P and dS, logits)
# and the result to 11 (fp16) or 8 (bf16) bits.
TOLERANCES = {
    "cpu": {FP32: (1e-4, 1e-4), FP16: (1e-2, 1e-2), BF16: (5e-2, 5e-2)},
    "cuda": GPU_TOLERANCES,
}
ALL_DTYPES = (FP32, FP16, BF16)


@dataclass
class Case:
    """One call of an op: `build(dtype, generator, device)` -> (positional args, keyword args), each a dict by
    parameter name; every floating-point tensor among them gets a gradient checked. The case builders below
    are shared with bench/op.py, which calls them at benchmark sizes."""
    label: str
    build: Callable[[torch.dtype, torch.Generator, str], tuple[dict, dict]]
    dtypes: tuple = ALL_DTYPES
    random: bool = False     # dropout: the output is random, so check for an error or a visible effect


def randn(*shape, dtype, gen, device, scale=1.0, shift=0.0):
    # Drawn on the CPU from a seeded generator, so every device and dtype sees the same values.
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype)


# ---------------------------------------------------------------------------------------- attention

def attention_case(label, batch, heads, t_q, t_k, head_dim, dtypes=ALL_DTYPES, padded_keys=0, **kwargs):
    """Dense q (B, H, Tq, D), k and v (B, H, Tk, D). padded_keys > 0: a decode step's mask, (B, 1, Tq, Tk),
    True = may attend: bottom-right causal and not one of row 0's first `padded_keys` (left-padding) keys."""
    def build(dtype, gen, device):
        q = randn(batch, heads, t_q, head_dim, dtype=dtype, gen=gen, device=device)
        k, v = (randn(batch, heads, t_k, head_dim, dtype=dtype, gen=gen, device=device) for _ in range(2))
        extra = dict(kwargs)
        if padded_keys:
            allowed = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q).repeat(batch, 1, 1, 1)
            allowed[0, :, :, :padded_keys] = False
            extra.update(mask=allowed.to(device), causal=False)
        return {"q": q, "k": k, "v": v}, extra
    return Case(label, build, dtypes, random=kwargs.get("dropout_p", 0.0) > 0)


def packed_attention_case(label, lengths, heads, head_dim, dtypes=ALL_DTYPES):
    """Sequences of `lengths` packed into (total, H, D) rows, bounds in cu_seqlens (N + 1,) int32."""
    def build(dtype, gen, device):
        total = sum(lengths)
        q, k, v = (randn(total, heads, head_dim, dtype=dtype, gen=gen, device=device) for _ in range(3))
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return {"q": q, "k": k, "v": v}, dict(cu_seqlens=cu_seqlens.to(device), max_seqlen=max(lengths))
    return Case(label, build, dtypes)


ATTENTION_CASES = [
    attention_case("causal-T37-D64", 2, 3, 37, 37, 64),                 # inside one block, odd head count
    attention_case("causal-T1-D80", 1, 2, 1, 1, 80),                    # length 1; D=80 pads to a block
    attention_case("full-T70-D64-scale", 1, 2, 70, 70, 64, dtypes=(FP32,), causal=False, scale=0.3),
    attention_case("decode-Tq1-Tk17", 2, 2, 1, 17, 64, dtypes=(FP32,)),  # one new token against a cache
    attention_case("decode-masked-Tq3-Tk19", 2, 2, 3, 19, 80, padded_keys=4),
    packed_attention_case("packed-5-1-70-33", [5, 1, 70, 33], 2, 64),   # one crosses a 64-row block
    attention_case("dropout", 1, 2, 16, 16, 64, dtypes=(FP32,), dropout_p=0.5),
]


# --------------------------------------------------------------------------------------- layer_norm

def layer_norm_case(label, shape, residual=True, affine=True, dtypes=ALL_DTYPES):
    """x (and residual) of `shape`, LayerNorm over the last dim; weight near 1 and bias near 0, not exactly."""
    def build(dtype, gen, device):
        width = shape[-1]
        args = {"x": randn(*shape, dtype=dtype, gen=gen, device=device, scale=2.0, shift=0.5),
                "weight": randn(width, dtype=dtype, gen=gen, device=device, scale=0.1, shift=1.0) if affine else None,
                "bias": randn(width, dtype=dtype, gen=gen, device=device, scale=0.1) if affine else None,
                "eps": 1e-5}
        kwargs = {"residual": randn(*shape, dtype=dtype, gen=gen, device=device)} if residual else {}
        return args, kwargs
    return Case(label, build, dtypes)


LAYER_NORM_CASES = [
    layer_norm_case("rows37-N64", (37, 64)),
    layer_norm_case("batch2x5-N80", (2, 5, 80)),                        # width not a power of two
    layer_norm_case("rows3-N1024", (3, 1024)),                          # opt-350m's width
    layer_norm_case("row1-N1024-no-residual", (1, 1024), residual=False),
    layer_norm_case("rows4-N80-no-affine", (4, 80), affine=False, dtypes=(FP32, FP16)),
]


# ----------------------------------------------------------------------------- linear_cross_entropy

def linear_cross_entropy_case(label, tokens, width, vocab, ignored=(), dtypes=ALL_DTYPES, **kwargs):
    """hidden (N, E), head weight (V, E), targets (N,) with the positions in `ignored` set to ignore_index."""
    ignore_index = kwargs.get("ignore_index", -100)

    def build(dtype, gen, device):
        hidden = randn(tokens, width, dtype=dtype, gen=gen, device=device)
        weight = randn(vocab, width, dtype=dtype, gen=gen, device=device, scale=width ** -0.5)   # logits of unit scale
        targets = torch.randint(vocab, (tokens,), generator=gen)
        targets[list(ignored)] = ignore_index
        return {"hidden": hidden, "weight": weight, "targets": targets.to(device)}, kwargs
    return Case(label, build, dtypes)


OPT_VOCAB = 50272
LINEAR_CROSS_ENTROPY_CASES = [
    linear_cross_entropy_case("N5-E64-V50272-sum", 5, 64, OPT_VOCAB, ignored=(1, 3)),
    linear_cross_entropy_case("N1-E80-V50272-mean", 1, 80, OPT_VOCAB, dtypes=(FP32,), reduction="mean"),
    linear_cross_entropy_case("N37-E1024-V503-none", 37, 1024, 503, ignored=(0, 36), dtypes=(FP32, FP16),
                              reduction="none", ignore_index=1),
    linear_cross_entropy_case("N9-E64-V131-mean-one-trained", 9, 64, 131, ignored=range(8), reduction="mean"),
]

CASES = {"attention": ATTENTION_CASES, "layer_norm": LAYER_NORM_CASES,
         "linear_cross_entropy": LINEAR_CROSS_ENTROPY_CASES}


# The peers bench/op.py times beside each implementation: what a model without our kernels runs.

def sdpa_peer(q, k, v, causal=True, **_):
    """Attention as torch's SDPA computes it, dense rows: (B, H, T, D) -> (B, H, T, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def add_then_layer_norm(x, weight, bias, eps, residual=None):
    """The residual add and F.layer_norm as two ops, in x's dtype."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, h.shape[-1:], weight, bias, eps)


def materialised_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum"):
    """F.cross_entropy on the whole (N, V) logits, taken to fp32 as train.py's loss does."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index, reduction=reduction)


PEERS = {"attention": sdpa_peer, "layer_norm": add_then_layer_norm, "linear_cross_entropy": materialised_cross_entropy}


# --------------------------------------------------------------------------------------- the checks

def is_float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def upcast(values: dict) -> dict:
    """The same values with every floating-point tensor in fp32: what the reference is run on."""
    return {name: x.float() if is_float_tensor(x) else x for name, x in values.items()}


def run_with_gradients(fn, args: dict, kwargs: dict, grad_out_seed: int):
    """fn(*args, **kwargs) and the gradient of each floating-point tensor among them, by name, for a seeded
    random upstream gradient."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in {**args, **kwargs}.items()
              if is_float_tensor(x)}
    out = fn(*(leaves.get(name, x) for name, x in args.items()), **{**kwargs, **{
        name: leaves[name] for name in kwargs if name in leaves}})
    gen = torch.Generator().manual_seed(grad_out_seed)
    out.backward(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
    return out, {name: x.grad for name, x in leaves.items()}


def check_case(op: str, name: str, case: Case, dtype: torch.dtype) -> list[str]:
    """Failed checks of implementation `name` of `op` on one case in one dtype; [] when it conforms."""
    fn, reference = kernels.get(op, name), kernels.get(op, kernels.REFERENCE[op])
    args, kwargs = case.build(dtype, torch.Generator().manual_seed(0), DEVICE)
    where = f"{op}={name} [{case.label}, {str(dtype).replace('torch.', '')}, {DEVICE}]"
    if case.random:
        return [f"{where} {m}" for m in check_random(fn, args, kwargs)]
    try:
        out, grads = run_with_gradients(fn, args, kwargs, grad_out_seed=1)
    except Exception as error:  # noqa: BLE001 -- reported as a failure, so a user's report lists every case
        return [f"{where} raised {error!r}"]
    ref_out, ref_grads = run_with_gradients(reference, upcast(args), upcast(kwargs), grad_out_seed=1)
    atol, rtol = TOLERANCES[DEVICE][dtype]
    failures = difference("output", out, ref_out, atol, rtol)
    if out.is_floating_point() and ref_out.dtype == FP32 and out.dtype not in (dtype, FP32):
        failures.append(f"output dtype {out.dtype}, expected {dtype} or float32")
    for input_name, ref_grad in ref_grads.items():
        failures += difference(f"grad {input_name}", grads[input_name], ref_grad, atol, rtol)
    return [f"{where} {m}" for m in failures]


def check_random(fn, args: dict, kwargs: dict) -> list[str]:
    """dropout_p > 0: a clear error naming dropout, or a finite output that differs from dropout_p=0's."""
    try:
        out = fn(*args.values(), **kwargs)
    except Exception as error:  # noqa: BLE001 -- any error type is fine if it says what it cannot do
        return [] if "dropout" in str(error).lower() else [f"raised an error that does not name dropout: {error!r}"]
    without = fn(*args.values(), **{**kwargs, "dropout_p": 0.0})
    if out.shape != without.shape or not torch.isfinite(out).all():
        return [f"with dropout: output of shape {tuple(out.shape)} (expected {tuple(without.shape)}) or not finite"]
    if torch.equal(out, without):
        return [f"dropout_p={kwargs['dropout_p']} had no effect and raised no error"]
    return []


def conformance_failures(op: str, name: str) -> list[str]:
    """Every failed check of implementation `name` of `op` over all of the op's cases; [] when it conforms."""
    return [failure for case in CASES[op] for dtype in case.dtypes for failure in check_case(op, name, case, dtype)]


def selected_implementations(specs: list[str]) -> list[tuple[str, str]]:
    """[(op, name)] from --kernel OP=NAME options, or every registered implementation when there are none."""
    if not specs:
        return [(op, name) for op, names in kernels.available().items() if op in CASES for name in names]
    chosen = []
    for spec in specs:
        op, sep, name = spec.partition("=")
        if not sep or not op or not name:
            raise pytest.UsageError(f"--kernel {spec!r}: expected OP=NAME, e.g. --kernel layer_norm=triton")
        kernels.get(op, name)   # the registry's error when it is unknown, listing what exists
        if op not in CASES:
            raise pytest.UsageError(f"--kernel {spec}: the suite has no cases for op {op!r} "
                                    f"(it has {', '.join(CASES)})")
        chosen.append((op, name))
    return chosen


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        # The reference in fp32 is what every check compares with: against itself it could not fail.
        params = [pytest.param(op, name, case, dtype, id=f"{op}={name}-{case.label}-{str(dtype)[6:]}")
                  for op, name in selected_implementations(metafunc.config.getoption("kernel"))
                  for case in CASES[op] for dtype in case.dtypes
                  if not (name == kernels.REFERENCE[op] and dtype == FP32)]
        metafunc.parametrize("op,name,case,dtype", params)


def test_conforms(op, name, case, dtype):
    failures = check_case(op, name, case, dtype)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ the suite itself

def test_every_op_has_a_reference_and_cases():
    for op in kernels.available():
        if op in kernels.REFERENCE:
            assert op in CASES, f"op {op!r} has a reference but no conformance cases in this file"
            assert kernels.REFERENCE[op] in kernels.available()[op]


def user_layer_norm(x, weight, bias, eps, residual=None):
    """What a user might write: LayerNorm(x + residual) from its definition, statistics in fp32."""
    h = (x if residual is None else x + residual).float()
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float() + bias.float()
    return y.to(x.dtype)


def forgets_residual(x, weight, bias, eps, residual=None):
    return user_layer_norm(x, weight, bias, eps)


def frozen_weight(x, weight, bias, eps, residual=None):
    """Right forward, but no gradient reaches the weight."""
    return user_layer_norm(x, weight.detach(), bias, eps, residual)


def wrong_residual_gradient(x, weight, bias, eps, residual=None):
    """Right forward, but the residual's gradient is twice what it should be."""
    if residual is not None:
        residual = residual + (residual - residual.detach())   # value unchanged, gradient doubled
    return user_layer_norm(x, weight, bias, eps, residual)


@pytest.mark.parametrize("op", list(PEERS))
def test_the_benchmark_peers_conform(kernel_registry, op):
    kernel_registry(op, "peer", PEERS[op])
    case = CASES[op][0]
    assert check_case(op, "peer", case, FP32) == []


def test_a_users_implementation_conforms(kernel_registry):
    kernel_registry("layer_norm", "user_example", user_layer_norm)
    assert conformance_failures("layer_norm", "user_example") == []


@pytest.mark.parametrize("broken,symptom", [(forgets_residual, "output: "), (frozen_weight, "grad weight: no gradient"),
                                            (wrong_residual_gradient, "grad residual: ")])
def test_a_wrong_implementation_fails(kernel_registry, broken, symptom):
    kernel_registry("layer_norm", "broken", broken)
    failures = conformance_failures("layer_norm", "broken")
    assert failures and any(symptom in f for f in failures), failures
    if symptom == "output: ":
        assert "max diff" in failures[0] and "mean diff" in failures[0]


def test_kernel_option_selects_one_implementation():
    """--kernel layer_norm=torch collects that implementation's cases and nothing else."""
    command = [sys.executable, "-m", "pytest", "-q", "--collect-only", str(Path(__file__)),
               "--kernel", "layer_norm=torch", "-k", "test_conforms"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    collected = [line for line in result.stdout.splitlines() if "::test_conforms[" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    expected = sum(dtype != FP32 for case in LAYER_NORM_CASES for dtype in case.dtypes)   # torch is the reference
    assert len(collected) == expected and all("[layer_norm=torch-" in line for line in collected), result.stdout
