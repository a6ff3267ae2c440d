"""What the kernel tests and the benchmarks share to check a kernel: the tolerance table, the comparison of a
kernel's tensor with its fp32 reference, attention's outputs and gradients side by side, and the
conformance suite's cases, peers and checks (tests/test_kernel_conformance.py runs them under pytest,
bench/op.py builds its inputs with the case builders and times the peers).

    from slm.kernels import testing
    atol, rtol = testing.TOLERANCES["cuda"][torch.bfloat16]
    testing.difference("dq", q.grad, q_ref.grad, atol, rtol)   # [] or one message
    testing.assert_close("dq", q.grad, q_ref.grad, atol, rtol)
    testing.conformance_failures("layer_norm", "triton")        # [] when the implementation conforms
    args, kwargs = testing.layer_norm_case("bench", (16384, 1024)).build(torch.bfloat16, generator, "cuda")

Within tolerance means |actual - expected| <= atol + rtol * |expected| everywhere (a NaN never is).

Each conformance case of an op (CASES) calls the implementation in the case's dtype and the reference
(kernels.REFERENCE) on the same values in fp32, backpropagates the same random upstream gradient through
both, and compares the output and the gradient of every floating input within TOLERANCES. The cases are
the awkward ones: lengths that are not a multiple of a block, length 1, packed sequences (cu_seqlens),
decode shapes (Tq < Tk, with and without a mask), widths 64/80/1024, head dims 64/80, ignore_index (the
default and another), the 50,272-entry OPT vocabulary at a handful of tokens. An implementation that
cannot do a case must say so: dropout (random, so not compared) passes either with an error naming
dropout (the Triton attention) or with an output that dropout visibly changed.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from slm import kernels

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL_DTYPES = (FP32, FP16, BF16)

# (atol, rtol) by device kind and input dtype, for every op's output and gradients against the fp32
# reference on the same values, so the error is the implementation's arithmetic alone. On a CPU (the
# interpreter's fp32 dots are exact) fp32 differs by summation order; a GPU runs fp32 dots as tf32
# (10 mantissa bits). Half precision pays for rounding intermediates (attention's P and dS, the logits,
# x + residual) and the result to 11 (fp16) or 8 (bf16) bits, on either device. The CPU's rows are
# 2.5-3x the largest error the kernel tests met there (interpreter, cfd461d).
TOLERANCES = {
    "cpu": {FP32: (2e-5, 1e-5), FP16: (1e-2, 1e-2), BF16: (5e-2, 5e-2)},
    "cuda": {FP32: (2e-2, 2e-2), FP16: (1e-2, 1e-2), BF16: (5e-2, 5e-2)},
}


def default_device() -> str:
    """Where checks run unless told: the GPU when there is one, else the CPU (Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def tolerance(device, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for tensors of `dtype` computed on `device` (a torch.device or its name)."""
    return TOLERANCES[torch.device(device).type][dtype]


# ---------------------------------------------------------------------------------------- comparing

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


# ------------------------------------------------------------------------------------ conformance cases

@dataclass
class Case:
    """One call of an op: `build(dtype, generator, device)` -> (positional args, keyword args), each a dict by
    parameter name; every floating-point tensor among them gets a gradient checked."""
    label: str
    build: Callable[[torch.dtype, torch.Generator, str], tuple[dict, dict]]
    dtypes: tuple = ALL_DTYPES
    random: bool = False     # dropout: the output is random, so check for an error or a visible effect


def randn(*shape, dtype, gen, device, scale=1.0, shift=0.0):
    # Drawn on the CPU from a seeded generator, so every device and dtype sees the same values.
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype)


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


# ----------------------------------------------------------------------------------- conformance checks

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


def check_case(op: str, name: str, case: Case, dtype: torch.dtype, device: str | None = None) -> list[str]:
    """Failed checks of implementation `name` of `op` on one case in one dtype; [] when it conforms."""
    device = device or default_device()
    fn, reference = kernels.get(op, name), kernels.get(op, kernels.REFERENCE[op])
    args, kwargs = case.build(dtype, torch.Generator().manual_seed(0), device)
    where = f"{op}={name} [{case.label}, {str(dtype).replace('torch.', '')}, {device}]"
    if case.random:
        return [f"{where} {m}" for m in check_random(fn, args, kwargs)]
    try:
        out, grads = run_with_gradients(fn, args, kwargs, grad_out_seed=1)
    except Exception as error:  # noqa: BLE001 -- reported as a failure, so a user's report lists every case
        return [f"{where} raised {error!r}"]
    ref_out, ref_grads = run_with_gradients(reference, upcast(args), upcast(kwargs), grad_out_seed=1)
    atol, rtol = tolerance(device, dtype)
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


def conformance_failures(op: str, name: str, device: str | None = None) -> list[str]:
    """Every failed check of implementation `name` of `op` over all of the op's cases; [] when it conforms."""
    return [failure for case in CASES[op] for dtype in case.dtypes
            for failure in check_case(op, name, case, dtype, device)]
