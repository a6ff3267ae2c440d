"""Tests for kernels/compile_check.py and `bench/attention.py --compile-only`: the attention kernels
compiled for real GPUs (sm_86 A10G, sm_90 H100) on a machine without one.

    pytest tests/test_compile_check.py

Compiling needs Triton's real compiler, so the compiling tests run in a fresh process without
TRITON_INTERPRET (this one has it set on CPU, see conftest.py). The command-line tests compile a
representative subset, the variants nearest the limits and the model's own shape (up to a minute or two
each on 2 cores); the script's default is the full set (about 5 minutes per architecture).
"""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from kernels.compile_check import compile_launch


def run_compiler(args: list[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def run_script(script: str) -> str:
    result = run_compiler(["-c", script])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_compiles_with_the_runtime_specialisation():
    """compile_launch on the model's shape (bf16, D=64) for sm_90: the runtime's 16-byte alignment hints
    turn on async copies, whose pipeline buffers take the forward to 65,536 B; the old hand-built
    signature without them reported 24,576 B, a kernel that never runs. Each launched kernel comes back
    once, with its registers from ptxas."""
    out = run_script("""
import sys, torch
sys.path.insert(0, "bench")
from attention import launch_variant
from kernels.compile_check import compile_launch
compiled = compile_launch(lambda: launch_variant(torch.bfloat16, 64, True, packed=False), 90)
for k in compiled:
    print(k.kernel, k.shared, k.registers, k.spill_stores, k.fits)
""")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert list(rows) == ["_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"], out
    assert int(rows["_fwd_kernel"][0]) == 65_536, out
    assert all(0 < int(registers) <= 255 and fits == "True" for _, registers, _, fits in rows.values()), out


def test_unknown_architecture_is_an_error():
    with pytest.raises(ValueError, match="no shared-memory limit known for sm_75"):
        compile_launch(lambda: None, 75)


def test_compile_only_fits_an_a10g(tmp_path):
    """sm_86 has the least shared memory: the largest variants (head dim 128, fp32 and bf16) fit, and
    no kernel spills registers."""
    result = run_compiler(["bench/attention.py", "--compile-only", "86", "--dtypes", "float32", "bfloat16",
                           "--head-dims", "128", "--out", str(tmp_path / "sm86.json")])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "all 14 kernels fit sm_86" in result.stdout, result.stdout[-4000:]
    kernels = [line for line in result.stdout.splitlines() if line.startswith("sm_86")]
    assert len(kernels) == 14 and all(" spills   0 B" in line for line in kernels), result.stdout


def test_compile_only_fits_an_h100(tmp_path):
    """sm_90 at the model's own shape (OPT-350M: bf16, head dim 64), without register spills."""
    result = run_compiler(["bench/attention.py", "--compile-only", "90", "--dtypes", "bfloat16",
                           "--head-dims", "64", "--out", str(tmp_path / "sm90.json")])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "all 7 kernels fit sm_90" in result.stdout, result.stdout[-4000:]
    kernels = [line for line in result.stdout.splitlines() if line.startswith("sm_90")]
    assert len(kernels) == 7 and all(" spills   0 B" in line for line in kernels), result.stdout


def test_compile_only_fails_over_the_limit(tmp_path):
    """The fp32 backward blocks of 64 rows at D=128 (the settings before the per-GPU choice, still what
    an H100 gets) need 114,944 B: over sm_86's 101,376. The script reports it and exits non-zero; the
    launch stops at that kernel, as on a GPU, so dQ is not compiled."""
    script = ("import importlib, runpy, sys\n"
              "fa = importlib.import_module('kernels.flash_attention')\n"
              "original = fa.launch_config\n"
              "fa.launch_config = lambda head_dim, dtype, shared_memory: original(head_dim, dtype, 232_448)\n"
              f"sys.argv = ['bench/attention.py', '--compile-only', '86', '--dtypes', 'float32', "
              f"'--head-dims', '128', '--out', {str(tmp_path / 'over.json')!r}]\n"
              "runpy.run_path('bench/attention.py', run_name='__main__')\n")
    result = run_compiler(["-c", script])
    assert result.returncode != 0
    assert "do not fit sm_86" in result.stderr, result.stderr[-2000:]
    over = [line for line in result.stdout.splitlines() if "OVER THE LIMIT" in line]
    assert over and all("_bwd_dkdv_kernel" in line and "114,944" in line for line in over), result.stdout
    assert "_bwd_dq_kernel" not in result.stdout, result.stdout
