"""Benchmark of kernels/flash_attention.py against torch SDPA (flash and cuDNN backends), on a GPU.

    PYTHONPATH=. python bench/attention.py [--out bench_attention.json]
    PYTHONPATH=. python bench/attention.py --check-only     # correctness only; on CPU via Triton's interpreter
    PYTHONPATH=. python bench/attention.py --compile-only 86  # every kernel as an A10G runs it, no GPU needed

Checks correctness first (our kernels vs the fp32 reference, forward and gradients, several dtypes and
head dims, dense and packed) and stops if a check fails. Then times, with triton.testing.do_bench
(median), OPT-350M attention shapes: H=16, D=64, causal, bf16, 16k tokens per batch, T in {512, 1024,
2048}; and packed sequences of a realistic length mix against the same sequences padded to the longest
(the cost a padded batch pays) and against equal lengths run dense. Prints a table and writes JSON with
the device name, commit and versions next to every figure. From Python: `run(device, ...)` returns that
JSON's dict (bench/gpu_check.py calls it at its own sizes).

FLOPs (in `attention_flops`): forward 4 * B * H * T^2 * D (two matmuls of 2*T*T*D per head), halved when
causal; backward 2.5x the forward (five matmuls to the forward's two); fwd+bwd 3.5x. Packed batches count
the real FLOPs, sum over sequences of 4 * H * L^2 * D (halved when causal); padding earns nothing.
--compile-only ARCH (80 A100, 86 A10G / RTX 30xx, 89 L4 / RTX 40xx, 90 H100 / H200) runs every variant
the model can request (fp16 / bf16 / fp32, head dims 32 / 64 / 80 / 128, causal or not, dense or packed)
through the kernels' own launchers, forward and backward, on a stand-in for that GPU
(kernels/compile_check.py, whose `python -m slm.kernels.compile_check ARCH` also checks the other
kernels): the launchers choose their settings for it and Triton specialises and
compiles as on the device. It prints each distinct kernel's shared memory against the limit, registers
and spills (ptxas -v), and exits non-zero when one is over the limit. This catches on a machine without
a GPU what the CPU interpreter cannot see (types, layouts, resources). About 5 minutes per architecture
on 2 CPU cores; tests/test_compile_check.py runs a subset.

Each input tensor of the timed shapes is 32 MiB, larger than the H100's 50 MB L2 taken three at a time,
so inputs are not rotated.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402
from slm import provenance  # noqa: E402
from slm.kernels import (  # noqa: E402
    attention_reference, attention_varlen_reference, compile_check, flash_attention, flash_attention_varlen, runtime)
from slm.kernels.testing import difference, outputs_and_gradients, tolerance  # noqa: E402

TOKENS_PER_BATCH = 16 * 1024
SEQ_LENS = (512, 1024, 2048)
HEADS, HEAD_DIM = 16, 64  # OPT-350M: hidden 1024 = 16 heads x 64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attention_flops(lengths: list[int], heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention over sequences of the given lengths: 4 * H * L^2 * D each, halved if causal."""
    flops = sum(4 * heads * length * length * head_dim for length in lengths)
    return flops / 2 if causal else flops


# ---------------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------------


def compare(kernel_fn, reference_fn, inputs) -> dict:
    """{name: (max |kernel - fp32 reference|, within tolerance)} for the output and each gradient,
    under one shared upstream gradient; the tolerance is kernels/testing.py's for the inputs' device."""
    atol, rtol = tolerance(inputs[0].device, inputs[0].dtype)
    pairs = outputs_and_gradients(kernel_fn, reference_fn, inputs)
    result = {}
    for name, (actual, expected) in pairs.items():
        result[name] = ((actual.float() - expected).abs().max().item(), not difference(name, actual, expected, atol, rtol))
    return result


def check_correctness(device: str, dtypes=DTYPES, head_dims=None, causals=(True, False)) -> list[dict]:
    """One row per dtype x head dim x causal x layout (dense and packed); head dims by default 64 / 80 / 128,
    on CPU (the interpreter) 64 only, where the sequences are short."""
    cpu = device == "cpu"
    head_dims = head_dims or ([64] if cpu else [64, 80, 128])
    seq_len = 37 if cpu else 300
    lengths = [5, 1, 70, 33] if cpu else [300, 1, 1000, 77, 513]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    results = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in causals:
                torch.manual_seed(0)
                dense = [torch.randn(2, 3, seq_len, head_dim, dtype=dtype, device=device) for _ in range(3)]
                packed = [torch.randn(sum(lengths), 3, head_dim, dtype=dtype, device=device) for _ in range(3)]
                cases = {
                    "dense": compare(lambda q, k, v: flash_attention(q, k, v, causal=causal),
                                     lambda q, k, v: attention_reference(q, k, v, causal=causal), dense),
                    "varlen": compare(
                        lambda q, k, v: flash_attention_varlen(q, k, v, cu_seqlens, max(lengths), causal=causal),
                        lambda q, k, v: attention_varlen_reference(q, k, v, cu_seqlens, max(lengths), causal=causal),
                        packed),
                }
                for layout, errors in cases.items():
                    row = dict(layout=layout, dtype=str(dtype).replace("torch.", ""), head_dim=head_dim,
                               causal=causal, ok=all(ok for _, ok in errors.values()),
                               **{name: err for name, (err, _) in errors.items()})
                    results.append(row)
                    print(f"check {layout:6s} {row['dtype']:8s} D={head_dim:3d} causal={causal!s:5s} "
                          f"max err out {row['out']:.2e} dq {row['dq']:.2e} dk {row['dk']:.2e} dv {row['dv']:.2e} "
                          f"{'ok' if row['ok'] else 'FAIL'}")
    return results


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def sdpa_fn(backend):
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def time_fwd_bwd(attend, inputs, bench=triton.testing.do_bench) -> dict:
    """Median ms of forward, backward (from a saved graph) and both, timed by `bench` (do_bench's
    signature: bench(fn, grad_to_none=...) -> ms)."""
    q, k, v = (x.detach().requires_grad_() for x in inputs)
    fwd = bench(lambda: attend(q, k, v))
    out = attend(q, k, v)
    grad_out = torch.randn_like(out)
    bwd = bench(lambda: out.backward(grad_out, retain_graph=True), grad_to_none=[q, k, v])
    both = bench(lambda: attend(q, k, v).backward(grad_out), grad_to_none=[q, k, v])
    return dict(fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both)


def with_tflops(row: dict, fwd_flops: float) -> dict:
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] * 1e-9
    row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] * 1e-9
    row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] * 1e-9
    return row


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return backends


def bench_dense(dtype, device="cuda", tokens=TOKENS_PER_BATCH, seq_lens=SEQ_LENS, heads=HEADS,
                bench=triton.testing.do_bench) -> list[dict]:
    rows = []
    for seq_len in seq_lens:
        batch = tokens // seq_len
        inputs = [torch.randn(batch, heads, seq_len, HEAD_DIM, dtype=dtype, device=device) for _ in range(3)]
        flops = attention_flops([seq_len] * batch, heads, HEAD_DIM, causal=True)
        impls = {"triton": lambda q, k, v: flash_attention(q, k, v, causal=True)}
        impls.update({name: sdpa_fn(backend) for name, backend in sdpa_backends().items()})
        for name, attend in impls.items():
            row = dict(case=f"dense B={batch} T={seq_len}", impl=name)
            try:
                row.update(time_fwd_bwd(attend, inputs, bench))
            except RuntimeError as error:  # a backend this GPU / build lacks: record it, keep going
                row["error"] = str(error).splitlines()[0]
                rows.append(row)
                continue
            rows.append(with_tflops(row, flops))
    return rows


def realistic_lengths(total: int, max_len: int, seed: int = 0) -> list[int]:
    """Sequence lengths drawn log-normally (median ~600 tokens, clipped to [16, max_len]) until `total`
    tokens are reached: the shape of SFT conversations packed into 2048-token rows."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        length = int(torch.empty(1).log_normal_(mean=6.4, std=0.8, generator=gen).clamp(16, max_len))
        lengths.append(min(length, total - sum(lengths)))
    return lengths


def bench_varlen(dtype, device="cuda", tokens=TOKENS_PER_BATCH, row_len=2048, heads=HEADS,
                 bench=triton.testing.do_bench) -> list[dict]:
    rows = []
    lengths = realistic_lengths(tokens, row_len)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    flops = attention_flops(lengths, heads, HEAD_DIM, causal=True)
    mix = f"{len(lengths)} seqs, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}"

    packed = [torch.randn(tokens, heads, HEAD_DIM, dtype=dtype, device=device) for _ in range(3)]
    row = dict(case=f"packed mix ({mix})", impl="triton varlen")
    row.update(time_fwd_bwd(lambda q, k, v: flash_attention_varlen(q, k, v, cu_seqlens, max(lengths)), packed, bench))
    rows.append(with_tflops(row, flops))

    # The same sequences as a padded batch: every one padded to the longest, FLOPs counted on real tokens.
    padded = [torch.randn(len(lengths), heads, max(lengths), HEAD_DIM, dtype=dtype, device=device) for _ in range(3)]
    impls = {"triton dense": lambda q, k, v: flash_attention(q, k, v, causal=True),
             "sdpa-flash": sdpa_fn(sdpa_backends()["sdpa-flash"])}
    for name, attend in impls.items():
        row = dict(case=f"padded to {max(lengths)} (same mix)", impl=name)
        row.update(time_fwd_bwd(attend, padded, bench))
        rows.append(with_tflops(row, flops))

    # Equal real tokens, equal lengths: varlen over 8 x 2048 against the dense kernel's T=2048 row.
    seq_len = row_len
    batch = tokens // seq_len
    even_cu = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32, device=device)
    flops = attention_flops([seq_len] * batch, heads, HEAD_DIM, causal=True)
    row = dict(case=f"packed {batch} x {seq_len}", impl="triton varlen")
    row.update(time_fwd_bwd(lambda q, k, v: flash_attention_varlen(q, k, v, even_cu, seq_len), packed, bench))
    rows.append(with_tflops(row, flops))
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'case':44s} {'impl':14s} {'fwd ms':>8s} {'bwd ms':>8s} {'f+b ms':>8s} {'fwd TF/s':>9s} " \
             f"{'bwd TF/s':>9s} {'f+b TF/s':>9s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['case']:44s} {row['impl']:14s} unavailable: {row['error'][:60]}")
            continue
        print(f"{row['case']:44s} {row['impl']:14s} {row['fwd_ms']:8.3f} {row['bwd_ms']:8.3f} "
              f"{row['fwd_bwd_ms']:8.3f} {row['fwd_tflops']:9.1f} {row['bwd_tflops']:9.1f} "
              f"{row['fwd_bwd_tflops']:9.1f}")


def run(device: str = "cuda", check_only: bool = False, tokens: int = TOKENS_PER_BATCH, seq_lens=SEQ_LENS,
        heads: int = HEADS, check: dict | None = None, bench=triton.testing.do_bench, partial=None) -> dict:
    """{"meta", "checks", "rows"}: check_correctness(device, **check) first; then, unless a check failed or
    check_only, the bf16 timings of bench_dense and bench_varlen (padded and equal rows at seq_lens[-1])
    at these sizes, timed by `bench`. partial(result) is called once the dense rows are in."""
    device_name = "cpu (Triton interpreter)" if device == "cpu" else torch.cuda.get_device_name()
    meta = dict(device=device_name, commit=provenance.git_commit(), torch=torch.__version__, triton=triton.__version__,
                command=" ".join(sys.argv), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"device {meta['device']} | commit {meta['commit']} | torch {meta['torch']} | triton {meta['triton']}")
    result = dict(meta=meta, checks=check_correctness(device, **(check or {})), rows=[])
    if check_only or not all(row["ok"] for row in result["checks"]):
        return result
    result["rows"] = bench_dense(torch.bfloat16, device, tokens, seq_lens, heads, bench)
    if partial:
        partial(result)
    result["rows"] += bench_varlen(torch.bfloat16, device, tokens, seq_lens[-1], heads, bench)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_attention.json", help="where to write the JSON results")
    parser.add_argument("--check-only", action="store_true",
                        help="run the correctness check and stop (on CPU through Triton's interpreter)")
    parser.add_argument("--compile-only", type=int, metavar="SM", default=None,
                        choices=sorted(compile_check.SHARED_MEMORY),
                        help="compile every kernel variant for this compute capability (86 = A10G, 90 = H100), "
                             "print shared memory, registers and spills, and fail if one is over the limit")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(compile_check.DTYPES),
                        default=sorted(compile_check.DTYPES), help="dtypes for --compile-only (default: all)")
    parser.add_argument("--head-dims", nargs="+", type=int, default=compile_check.HEAD_DIMS,
                        help=f"head dims for --compile-only (default: {compile_check.HEAD_DIMS})")
    args = parser.parse_args()

    cpu_check = args.check_only and not torch.cuda.is_available()
    if cpu_check and not runtime.interpreted():
        # Triton's interpreter is chosen when the kernels are built, at import: run this command again
        # with it on, as `TRITON_INTERPRET=1 python bench/attention.py --check-only` would.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if not args.check_only and runtime.interpreted():
        sys.exit("bench/attention.py: timing and --compile-only need the real compiler; unset TRITON_INTERPRET")

    if args.compile_only is not None:
        rows = compile_check.check(args.compile_only, compile_check.attention_variants(args.dtypes, args.head_dims))
        compile_check.write_report(args.out, args.compile_only, rows, "bench/attention.py", commit=provenance.git_commit())
        return

    if not cpu_check and not torch.cuda.is_available():
        sys.exit("bench/attention.py: timing needs a CUDA GPU; use --check-only on CPU")
    result = run("cpu" if cpu_check else "cuda", check_only=args.check_only)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    failed = [row for row in result["checks"] if not row["ok"]]
    if failed:
        sys.exit(f"bench/attention.py: {len(failed)} correctness checks failed; no timings taken")
    if args.check_only:
        print(f"all {len(result['checks'])} checks passed; wrote {args.out}")
        return
    print()
    print_table(result["rows"])
    print(f"\n{result['meta']['device']} | commit {result['meta']['commit']} | wrote {args.out}")


if __name__ == "__main__":
    main()
