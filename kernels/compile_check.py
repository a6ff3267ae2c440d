"""Compile Triton launchers for a GPU architecture on a machine without one, as the runtime would.

    from kernels.compile_check import compile_launch
    for k in compile_launch(lambda: my_launcher(*meta_tensors), arch=86):
        print(k.kernel, k.shared, k.registers, k.spill_stores, k.fits)

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

import itertools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable

from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime import driver
from triton.runtime.errors import OutOfResources

SHARED_MEMORY = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}  # bytes per block, opt-in maximum
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
