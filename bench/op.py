"""Time and measure the memory of any registered kernel implementation against its op's reference and peer.

    PYTHONPATH=. python bench/op.py --op attention --impl triton                     # B=8 H=16 T=2048 D=64
    PYTHONPATH=. python bench/op.py --op layer_norm --impl triton --tokens 16384 --width 1024
    PYTHONPATH=. python bench/op.py --op linear_cross_entropy --impl triton --tokens 16384
    PYTHONPATH=. python bench/op.py --op layer_norm --impl torch --device cpu --tokens 64 --width 64

Rows: the implementation (--impl, any name in kernels.available(), a user's included once registered),
the op's reference (kernels.REFERENCE) and the peer a model without our kernels runs (PEERS in
kernels/testing.py: torch SDPA; F.layer_norm after the add; F.cross_entropy on materialised fp32
logits). The inputs come from the conformance suite's case builders (kernels/testing.py) at the sizes
given here, and the implementation must first pass that suite (`conformance_failures`), on CUDA when
present. From Python: `run(parse_args([...]))` returns {"shapes", "rows"}, what --json writes.

Each row: forward and forward+backward time (median; triton.testing.do_bench on CUDA, wall clock on
CPU), throughput, and memory. Throughput formulas, in `work()`:
    attention             FLOPs, forward 4*B*H*Tq*Tk*D (two matmuls), halved when causal; backward 2.5x
    layer_norm            bytes, the least traffic: forward reads x and residual and writes y (3*M*N*size),
                          backward reads dy and x + residual and writes their shared gradient (3*M*N*size)
    linear_cross_entropy  FLOPs, forward logits 2*N*V*E; backward dhidden and dweight 4*N*V*E
Memory: "saved" is the bytes autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks, each
storage once) on every device; "peak" is torch.cuda.max_memory_allocated during forward+backward above the
inputs on CUDA, and "not measured" on CPU (the CPU allocator keeps no peak). On CPU the Triton kernels run
in Triton's interpreter: their times say nothing about the kernel. Device and commit are printed beside
every figure and written with them to --json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402

harness.interpret_without_gpu()

from slm import kernels  # noqa: E402
from slm import provenance  # noqa: E402
from slm.kernels.testing import (  # noqa: E402
    PEERS, attention_case, conformance_failures, layer_norm_case, linear_cross_entropy_case)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", required=True, choices=sorted(kernels.REFERENCE), help="the op to benchmark")
    p.add_argument("--impl", required=True, help="a registered implementation of --op (kernels.available())")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="input dtype (default bf16)")
    p.add_argument("--batch", type=int, default=8, help="attention: rows B (default 8)")
    p.add_argument("--heads", type=int, default=16, help="attention: heads H (default 16, opt-350m)")
    p.add_argument("--seq-len", type=int, default=2048, help="attention: tokens per row T (default 2048)")
    p.add_argument("--head-dim", type=int, default=64, help="attention: head dim D (default 64)")
    p.add_argument("--tokens", type=int, default=16384, help="layer_norm rows / cross-entropy tokens (16384)")
    p.add_argument("--width", type=int, help="layer_norm width (default 1024) / cross-entropy hidden "
                                             "(default 512, opt-350m's head)")
    p.add_argument("--vocab", type=int, default=50272, help="cross-entropy vocabulary (default 50272)")
    p.add_argument("--reps", type=int, default=5, help="CPU: timed repetitions, the median is shown")
    p.add_argument("--skip-check", action="store_true", help="skip the conformance check (it runs first)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = 1024 if args.op == "layer_norm" else 512
    kernels.get(args.op, args.impl)   # the registry's error, listing what exists, before any work
    return args


def make_case(args):
    """The conformance suite's case builder for --op, at the sizes given."""
    if args.op == "attention":
        return attention_case("bench", args.batch, args.heads, args.seq_len, args.seq_len, args.head_dim)
    if args.op == "layer_norm":
        return layer_norm_case("bench", (args.tokens, args.width))
    return linear_cross_entropy_case("bench", args.tokens, args.width, args.vocab)


def work(args, element_size: int) -> tuple[float, float, str]:
    """(forward, forward+backward) work and its unit: FLOPs for the matmul ops, bytes for layer_norm."""
    if args.op == "attention":
        forward = 4 * args.batch * args.heads * args.seq_len ** 2 * args.head_dim / 2   # causal: half
        return forward, 3.5 * forward, "TFLOP/s"
    if args.op == "layer_norm":
        forward = 3 * args.tokens * args.width * element_size
        return forward, 2 * forward, "GB/s"
    forward = 2 * args.tokens * args.vocab * args.width
    return forward, 3 * forward, "TFLOP/s"


def timed_ms(fn, device: str, reps: int) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs, each storage counted once."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure(fn, args, kwargs, device: str, reps: int) -> dict:
    """Forward and forward+backward times, bytes saved for backward and (CUDA) peak memory of one call."""
    leaves = {n: x.detach().requires_grad_() for n, x in {**args, **kwargs}.items()
              if isinstance(x, torch.Tensor) and x.is_floating_point()}
    call_args = [leaves.get(n, x) for n, x in args.items()]
    call_kwargs = {n: leaves.get(n, x) for n, x in kwargs.items()}
    grad = torch.randn_like(fn(*call_args, **call_kwargs).detach())

    def forward():
        with torch.no_grad():
            fn(*call_args, **call_kwargs)

    def forward_backward():
        for x in leaves.values():
            x.grad = None
        fn(*call_args, **call_kwargs).backward(grad)

    result = {"fwd_ms": timed_ms(forward, device, reps), "fwd_bwd_ms": timed_ms(forward_backward, device, reps),
              "saved_mib": saved_bytes(lambda: fn(*call_args, **call_kwargs)) / 2**20, "peak_mib": None}
    if device == "cuda":
        for x in leaves.values():
            x.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def run(args) -> dict:
    """{"shapes": the sizes, "rows": one per implementation} for `parse_args`'s namespace; no conformance
    check (main runs it first)."""
    dtype = DTYPES[args.dtype]
    call_args, call_kwargs = make_case(args).build(dtype, torch.Generator().manual_seed(0), args.device)
    fwd_work, fwd_bwd_work, unit = work(args, dtype.itemsize)
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    device, commit = provenance.device_name(args.device), provenance.git_commit()
    reference = kernels.REFERENCE[args.op]
    candidates = {args.impl: kernels.get(args.op, args.impl)}
    if args.impl != reference:
        candidates[f"{reference} (reference)"] = kernels.get(args.op, reference)
    candidates[f"peer: {PEERS[args.op].__name__}"] = PEERS[args.op]

    rows = []
    for name, fn in candidates.items():
        figures = measure(fn, call_args, call_kwargs, args.device, args.reps)
        rows.append({"op": args.op, "impl": name, "dtype": args.dtype, "device": device, "commit": commit,
                     "unit": unit, "fwd": fwd_work / figures["fwd_ms"] / 1e-3 / scale,
                     "fwd_bwd": fwd_bwd_work / figures["fwd_bwd_ms"] / 1e-3 / scale, **figures})
    shapes = {k: getattr(args, k) for k in ("batch", "heads", "seq_len", "head_dim")} if args.op == "attention" \
        else {"tokens": args.tokens, "width": args.width, **({"vocab": args.vocab} if args.op != "layer_norm" else {})}
    return {"shapes": shapes, "rows": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.skip_check:
        failures = conformance_failures(args.op, args.impl)
        if failures:
            sys.exit(f"bench/op.py: {args.op}={args.impl} fails the conformance suite:\n" + "\n".join(failures))
        print(f"{args.op}={args.impl}: passes the conformance suite")
    result = run(args)
    unit = result["rows"][0]["unit"]
    print(f"\n{args.op}, {args.dtype}, {result['shapes']}"
          + ("  (CPU: Triton runs in its interpreter)" * (args.device == "cpu")))
    print(f"{'implementation':<36} {'fwd ms':>9} {'fwd+bwd ms':>11} {unit + ' f/fb':>20} {'saved MiB':>10} "
          f"{'peak MiB':>12}  device | commit")
    for r in result["rows"]:
        peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "not measured"
        print(f"{r['impl']:<36} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:11.3f} {r['fwd']:9.3g} /{r['fwd_bwd']:9.3g} "
              f"{r['saved_mib']:10.3f} {peak:>12}  {r['device']} | {r['commit']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
