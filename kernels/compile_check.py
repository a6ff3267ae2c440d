"""Compile Triton launchers for a GPU architecture on a machine without one, as the runtime would.

    PYTHONPATH=. python -m slm.kernels.compile_check 86 [--ops layer_norm linear_cross_entropy] [--out FILE]

    from slm.kernels.compile_check import compile_launch
    for k in compile_launch(lambda: my_launcher(*meta_tensors), arch=86):
        print(k.kernel, k.shared, k.registers, k.spill_stores, k.fits)

The command compiles every variant the model can request of every Triton kernel in kernels/ (VARIANTS:
attention's dtypes x head dims x causal x dense/packed; layer_norm's dtypes x widths 64 / 80 / 1024 /
8192 x residual x affine; linear_cross_entropy's dtypes x vocabularies 50,272 / 1,000 x the three ways
its kernel is launched), forward and backward, prints each distinct kernel's shared memory against the
limit, registers and spills, writes them as JSON, and exits non-zero when one is over the limit. On 2
CPU cores, per architecture: attention about 5 minutes (alone: `bench/attention.py --compile-only ARCH`),
layer_norm and linear_cross_entropy under 2 more; compiles are cached on disk, so a rerun takes seconds.

`compile_launch(launch, arch)` runs `launch` (any call of a kernel's launcher, on meta tensors) with
Triton's driver replaced by a stand-in for one sm_<arch> GPU. Everything up to the launch is Triton's
own path: the launcher picks its settings from the device properties (the stand-in reports the
target's shared-memory limit), `kernel[grid](...)` specialises every argument as on a GPU (pointers
and integers divisible by 16 get the alignment hints that turn on async copies and vector loads;
meta tensors have data_ptr() 0, so they count as aligned, as every CUDA allocation is) and compiles
to a cubin with ptxas. Only the launch itself is a no-op. Compiling through the launcher matters: a
hand-built signature without those hints measures kernels that never run (less shared memory,
different registers).

Each launched kernel comes back with its shared memory (`metadata.shared`, which Triton compares with
the device limit only when loading it on a GPU, so this module compares it here), and its registers
and spills from `ptxas -v` on the kernel's PTX (ptxas ships in triton/backends/nvidia/bin). A kernel
launched twice with one specialisation is reported once.

The limits are the opt-in shared memory per block of each architecture (CUDA programming guide,
"Compute capabilities"): A100 sm_80; A10G, L4 and RTX 30xx/40xx sm_86 / sm_89; H100 and H200 sm_90.
TRITON_INTERPRET must be unset: the interpreter builds no GPU code.
"""

import argparse
import functools
import importlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime import driver
from triton.runtime.errors import OutOfResources

from slm.kernels import runtime

# The modules (their launchers), not the functions `kernels` exports under the same names.
flash_attention = importlib.import_module("slm.kernels.flash_attention")
layer_norm = importlib.import_module("slm.kernels.layer_norm")
linear_cross_entropy = importlib.import_module("slm.kernels.linear_cross_entropy")

SHARED_MEMORY = runtime.SHARED_MEMORY  # bytes per block by architecture: the one table, in runtime.py
_calls = itertools.count()


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs on its architecture."""

    kernel: str  # the @triton.jit function's name
    arch: int
    shared: int  # bytes of shared memory per block
    shared_limit: int  # the architecture's maximum
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    num_warps: int
    num_stages: int
    constants: dict  # the constexpr arguments of this launch, e.g. {"BLOCK_M": 128}
    hash: str  # Triton's key of this compiled specialisation: equal hashes, one kernel

    @property
    def fits(self) -> bool:
        """True when the kernel can be loaded on the architecture (its shared memory is within the limit)."""
        return self.shared <= self.shared_limit


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports one sm_<arch> GPU and records launches instead of
    running them. Its device is a new name on each use: JITFunction keeps its compiled kernels per
    device, and a kernel already loaded under another stand-in would not be recorded by this one (the
    compiles themselves still come from Triton's cache on disk)."""

    def __init__(self, arch: int):
        self.arch = arch
        self.device = f"compile_check:sm_{arch}:{next(_calls)}"
        self.target = GPUTarget("cuda", arch, 32)
        self.launched = []  # (JITFunction, metadata) per launch, in order
        self.utils = self  # Triton calls driver.utils.get_device_properties / load_binary

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY[self.arch], "multiprocessor_count": 1, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        # (module, function, registers, spills, max threads); nothing is loaded, the numbers come from ptxas
        return None, None, 0, 0, 1024

    def launcher_cls(self, src, metadata):
        self.launched.append((src.fn, metadata))
        return lambda *args: None


def compile_launch(launch: Callable[[], object], arch: int) -> list[KernelResources]:
    """Run `launch` as on one sm_<arch> GPU and return every kernel it launched, compiled for it.

    A kernel over the shared-memory limit comes back with fits == False; Triton raises OutOfResources
    when it loads one, so the launch stops there and its later kernels are not in the list. Raises
    ValueError for an architecture without a known limit.
    """
    if arch not in SHARED_MEMORY:
        raise ValueError(f"kernels/compile_check.py: no shared-memory limit known for sm_{arch}; "
                         f"expected one of {sorted(SHARED_MEMORY)}")
    stand_in = _TargetDriver(arch)
    previous = driver._active  # not driver.active: on a machine without a GPU that raises (no driver)
    driver.set_active(stand_in)
    try:
        launch()
    except OutOfResources:
        # Triton checks the limit when it loads a kernel, after the stand-in has recorded it; the launch
        # stops there, so the kernels it would have launched next are not compiled.
        pass
    finally:
        driver._active = previous

    results, seen = [], set()
    for fn, metadata in stand_in.launched:
        if metadata.hash in seen:
            continue
        seen.add(metadata.hash)
        compiled = _compiled(fn, stand_in.device, metadata.hash)
        usage = ptxas_usage(compiled.asm["ptx"], arch)
        constants = {fn.arg_names[path[0]]: value for path, value in compiled.src.constants.items()}
        results.append(KernelResources(
            kernel=fn.__name__, arch=arch, shared=metadata.shared, shared_limit=SHARED_MEMORY[arch],
            num_warps=metadata.num_warps, num_stages=metadata.num_stages, constants=constants,
            hash=metadata.hash, **usage))
    return results


def _compiled(fn, device, kernel_hash):
    """Triton's CompiledKernel of `fn` with this hash (it holds the PTX), from the JITFunction's cache."""
    kernel_cache = fn.device_caches[device][0]
    return next(k for k in kernel_cache.values() if k.hash == kernel_hash)


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread of one kernel's PTX, from `ptxas -v` for sm_<arch>."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", source.name,
             "-o", "/dev/null"], capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"kernels/compile_check.py: could not read registers and spills from ptxas -v:\n{log}")
    return dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


# ---------------------------------------------------------------------------------------------------
# The variants of every kernel: launches through the kernels' own launchers, on meta tensors
# ---------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_DIMS = [32, 64, 80, 128]  # every head dim the model's configs use (OPT-350M: 64)
WIDTHS = [64, 80, 1024, 8192]  # layer_norm: a small width, one not a power of two, OPT-350M's, the maximum
VOCABS = [50_272, 1_000]  # OPT's vocabulary (three full blocks and a masked tail) and one block


def launch_attention(dtype, head_dim: int, causal: bool, packed: bool) -> None:
    """One forward and backward of kernels/flash_attention.py, shaped as the model passes them (16
    heads; dense rows or packed sequences)."""
    heads, seq_len, batch = 16, 256, 2
    if packed:
        shape, cu_seqlens = (batch * seq_len, heads, head_dim), [0, 100, batch * seq_len]
    else:
        shape, cu_seqlens = (batch, heads, seq_len, head_dim), [0, seq_len, batch * seq_len]
    q, k, v = (torch.empty(shape, dtype=dtype, device="meta") for _ in range(3))
    cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int32, device="meta")
    args = (cu_seqlens, seq_len, causal, head_dim ** -0.5, not packed)
    o, lse = flash_attention._forward(q, k, v, *args)
    flash_attention._backward(torch.empty_like(o), q, k, v, o, lse, *args)


def launch_layer_norm(dtype, width: int, residual: bool, affine: bool) -> None:
    """One forward and backward of kernels/layer_norm.py over 1,000 rows (the model's (B * T, E))."""
    x = torch.empty(1000, width, dtype=dtype, device="meta")
    r = torch.empty_like(x) if residual else None
    weight, bias = (torch.empty(width, dtype=dtype, device="meta") if affine else None for _ in range(2))
    y, z, mean, rstd = layer_norm._forward(x, weight, bias, r, 1e-5)
    layer_norm._backward(torch.empty_like(y), z, weight, bias, mean, rstd, dtype, None if r is None else dtype)


GRADIENTS = ("one-scale", "per-token-scale", "loss-only")  # linear_cross_entropy's three launches


def launch_linear_cross_entropy(dtype, vocab: int, gradient: str) -> None:
    """kernels/linear_cross_entropy.py's kernel in one of its three launches: the gradient scaled by one
    value (reduction "sum" / "mean"), by one value per token (the backward of "none"), or losses only.
    Over one 2048-token row at OPT-350M's width: chunks of whole blocks of rows, aligned as in training
    (a few dozen tokens would give 2-row chunks, whose misaligned offsets compile a second kernel)."""
    tokens, hidden_dim = 2048, 1024
    hidden = torch.empty(tokens, hidden_dim, dtype=dtype, device="meta")
    weight = torch.empty(vocab, hidden_dim, dtype=dtype, device="meta")
    targets = torch.empty(tokens, dtype=torch.int64, device="meta")
    scale = {"one-scale": torch.empty(1, device="meta").expand(tokens),
             "per-token-scale": torch.empty(tokens, device="meta"), "loss-only": None}[gradient]
    linear_cross_entropy._chunked_loss(hidden, weight, targets, -100, scale, True, True)


def attention_variants(dtypes=tuple(DTYPES), head_dims=tuple(HEAD_DIMS)) -> Iterator[tuple[dict, Callable]]:
    for dtype, head_dim, causal, packed in itertools.product(dtypes, head_dims, (True, False), (False, True)):
        yield (dict(op="attention", dtype=dtype, head_dim=head_dim, causal=causal,
                    layout="packed" if packed else "dense"),
               functools.partial(launch_attention, DTYPES[dtype], head_dim, causal, packed))


def layer_norm_variants(dtypes=tuple(DTYPES), widths=tuple(WIDTHS)) -> Iterator[tuple[dict, Callable]]:
    for dtype, width, residual, affine in itertools.product(dtypes, widths, (True, False), (True, False)):
        yield (dict(op="layer_norm", dtype=dtype, width=width, residual=residual, affine=affine),
               functools.partial(launch_layer_norm, DTYPES[dtype], width, residual, affine))


def linear_cross_entropy_variants(dtypes=tuple(DTYPES), vocabs=tuple(VOCABS)) -> Iterator[tuple[dict, Callable]]:
    for dtype, vocab, gradient in itertools.product(dtypes, vocabs, GRADIENTS):
        yield (dict(op="linear_cross_entropy", dtype=dtype, vocab=vocab, gradient=gradient),
               functools.partial(launch_linear_cross_entropy, DTYPES[dtype], vocab, gradient))


VARIANTS = {"attention": attention_variants, "layer_norm": layer_norm_variants,
            "linear_cross_entropy": linear_cross_entropy_variants}


def check(arch: int, variants) -> list[dict]:
    """Compile every kernel each (label, launch) variant launches for sm_<arch>; one printed row per
    distinct kernel (a specialisation two variants share is reported once, under the first)."""
    rows, seen = [], set()
    for label, launch in variants:
        for kernel in compile_launch(launch, arch):
            if kernel.hash in seen:
                continue
            seen.add(kernel.hash)
            row = dict(label, kernel=kernel.kernel, ok=kernel.fits, shared_bytes=kernel.shared,
                       shared_limit=kernel.shared_limit, registers=kernel.registers,
                       spill_stores=kernel.spill_stores, spill_loads=kernel.spill_loads,
                       num_warps=kernel.num_warps, num_stages=kernel.num_stages,
                       blocks={n: v for n, v in kernel.constants.items() if n.startswith("BLOCK")})
            rows.append(row)
            what = " ".join(f"{name}={value}" for name, value in label.items() if name != "op")
            print(f"sm_{arch} {kernel.kernel:24s} {what:44s} shared {kernel.shared:7,d} / {kernel.shared_limit:,d} B "
                  f"regs {kernel.registers:3d} spills {kernel.spill_stores:3d} B warps {kernel.num_warps} "
                  f"stages {kernel.num_stages} {'ok' if kernel.fits else 'OVER THE LIMIT (the launch stops here)'}",
                  flush=True)
    return rows


def write_report(path: str, arch: int, rows: list[dict], where: str, **meta) -> None:
    """Write the rows (and `meta`, e.g. the commit) as JSON and exit non-zero, naming `where`, when a
    kernel is over the limit."""
    meta = dict(target=f"sm_{arch}", triton=triton.__version__, **meta)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, compiled=rows), f, indent=2)
    failed = [row for row in rows if not row["ok"]]
    if failed:
        sys.exit(f"{where}: {len(failed)} of {len(rows)} kernels do not fit sm_{arch} "
                 f"(shared memory over {SHARED_MEMORY[arch]:,d} B); wrote {path}")
    print(f"all {len(rows)} kernels fit sm_{arch}; wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", type=int, choices=sorted(SHARED_MEMORY),
                        help="compute capability: 80 A100, 86 A10G / RTX 30xx, 89 L4 / RTX 40xx, 90 H100 / H200")
    parser.add_argument("--ops", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS),
                        help="which ops' kernels to compile (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES),
                        help="dtypes to compile (default: all)")
    parser.add_argument("--out", default=None, help="JSON results (default: compile_check_sm<ARCH>.json)")
    args = parser.parse_args(argv)
    if runtime.interpreted():
        sys.exit("kernels/compile_check.py: TRITON_INTERPRET=1 builds no GPU code; unset it to compile for a GPU")
    rows = check(args.arch, itertools.chain(*(VARIANTS[op](args.dtypes) for op in args.ops)))
    write_report(args.out or f"compile_check_sm{args.arch}.json", args.arch, rows, "kernels/compile_check.py")


if __name__ == "__main__":
    main()
