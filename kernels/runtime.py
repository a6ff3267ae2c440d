"""What every Triton kernel file in kernels/ asks of the runtime: interpreter or GPU, which device to
launch on, and how much shared memory a block may use there.

    from slm.kernels import runtime
    runtime.interpreted()                 # True under TRITON_INTERPRET=1 (CPU tests)
    runtime.check_device(_WHERE, x.device)              # a sentence, not a Triton error, for CPU tensors
    with runtime.on_device(x): kernel[grid](x, ...)     # launch on x's GPU
    launch_config(..., runtime.shared_memory())         # settings for the current device's limit

Importing this module applies kernels/interpreter_fix.py once when the kernels are interpreted, so every
kernel file runs under TRITON_INTERPRET=1 alone, whichever is imported first.
"""

import contextlib

import torch
import triton
from triton.runtime import driver

from slm.kernels import interpreter_fix

# Shared memory per block (bytes, opt-in maximum) of each architecture the kernels target: sm_80 A100,
# sm_86 A10G, sm_89 L4, sm_90 H100. kernels/compile_check.py compiles against these.
SHARED_MEMORY = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
SMALLEST_TARGET = 86


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True when Triton builds kernels for its CPU interpreter.

    Asks a kernel object rather than os.environ: TRITON_INTERPRET only counts if it was set before triton
    built the kernels, and the kernel files import this module before defining theirs, so the probe was
    built the way they were.
    """
    return not isinstance(_probe, triton.runtime.JITFunction)


def check_device(where: str, device: torch.device) -> None:
    """Raise a RuntimeError naming `where` (the kernel file) when tensors on `device` cannot reach the
    kernels: a CPU tensor with kernels built for a GPU rather than for the interpreter."""
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"{where}: tensors are on {device}, but the Triton kernels were built for a GPU. "
                           "Use a CUDA device, or set TRITON_INTERPRET=1 in the environment before "
                           "importing triton (and kernels) to run them on CPU through Triton's interpreter.")


def on_device(x: torch.Tensor):
    """Launch on x's GPU (a model on cuda:1 launches there, whatever the current device is)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def shared_memory() -> int:
    """Shared memory per block of the current device, as Triton checks it when loading a kernel
    (kernels/compile_check.py's stand-in GPU reports its target's)."""
    if interpreted():  # no GPU limit applies; use the smallest target's, so the CPU tests pick its settings
        return SHARED_MEMORY[SMALLEST_TARGET]
    return driver.active.utils.get_device_properties(driver.active.get_current_device())["max_shared_mem"]


def multiprocessor_count() -> int:
    """SMs of the current device (kernels that give each SM one program). Under the interpreter, which
    runs programs one after another, 4: more than one, so the CPU tests exercise the cross-program
    reduction, and few, so they stay fast."""
    if interpreted():
        return 4
    return driver.active.utils.get_device_properties(driver.active.get_current_device())["multiprocessor_count"]


if interpreted():  # Triton 3.6's interpreter fails data-dependent loop bounds with numpy >= 2.4; see there
    interpreter_fix.apply()
