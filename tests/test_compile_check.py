"""Tests for kernels/compile_check.py, `python -m slm.kernels.compile_check ARCH` and `bench/attention.py
--compile-only`: the Triton kernels (attention, layer_norm, linear_cross_entropy) compiled for real GPUs
(sm_86 A10G, sm_90 H100) on a machine without one.

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

from slm.kernels.compile_check import compile_launch


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
    turn on async copies, whose pipeline buffers take the forward to 65,536 B (a signature without them
    would report 24,576 B, a kernel that never runs). Each launched kernel comes back once, with its
    registers from ptxas."""
    out = run_script("""
import torch
from slm.kernels.compile_check import compile_launch, launch_attention
compiled = compile_launch(lambda: launch_attention(torch.bfloat16, 64, True, packed=False), 90)
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


@pytest.mark.parametrize("arch, dtypes, head_dim, count", [
    (86, ["float32", "bfloat16"], 128, 14),   # A10G: the least shared memory, the largest variants
    (90, ["bfloat16"], 64, 7),                 # H100: the model's own shape (OPT-350M: bf16, head dim 64)
])
def test_compile_only_fits(arch, dtypes, head_dim, count, tmp_path):
    """Every kernel of the variants fits the architecture's shared memory, and none spills registers."""
    result = run_compiler(["bench/attention.py", "--compile-only", str(arch), "--dtypes", *dtypes,
                           "--head-dims", str(head_dim), "--out", str(tmp_path / f"sm{arch}.json")])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"all {count} kernels fit sm_{arch}" in result.stdout, result.stdout[-4000:]
    kernels = [line for line in result.stdout.splitlines() if line.startswith(f"sm_{arch}")]
    assert len(kernels) == count and all(" spills   0 B" in line for line in kernels), result.stdout


def test_compile_only_fails_over_the_limit(tmp_path):
    """The fp32 backward blocks of 64 rows at D=128 (what an H100 gets) need 114,944 B: over sm_86's 101,376. The script reports it and exits non-zero; the
    launch stops at that kernel, as on a GPU, so dQ is not compiled."""
    script = ("import importlib, runpy, sys\n"
              "fa = importlib.import_module('slm.kernels.flash_attention')\n"
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


def test_layer_norm_and_linear_cross_entropy_fit_an_a10g_and_an_h100():
    """layer_norm and linear_cross_entropy at their widest: layer_norm at 8192 columns (16 warps, the backward's partial-sum
    rows through shared memory) and OPT-350M's 1024, linear_cross_entropy at OPT's 50,272-word vocabulary
    with its gradient written; each within sm_86's and sm_90's shared memory, without register spills."""
    out = run_script("""
from slm.kernels import compile_check as cc
variants = [v for v in cc.layer_norm_variants(["bfloat16", "float32"], [1024, 8192]) if v[0]["residual"]
            and v[0]["affine"]] + list(cc.linear_cross_entropy_variants(["bfloat16"], [50_272]))[:1]
for arch in (86, 90):
    rows = cc.check(arch, iter(variants))
    assert len(rows) == 9 and all(r["ok"] and r["spill_stores"] == 0 for r in rows), rows
""")
    assert out.count(" ok") == 18, out
    for arch in ("sm_86", "sm_90"):
        assert f"{arch} _layer_norm_bwd_kernel   dtype=float32 width=8192" in out, out
        assert f"{arch} _cross_entropy_kernel    dtype=bfloat16 vocab=50272" in out, out


def test_compile_check_command_fails_over_the_limit(tmp_path):
    """`python -m slm.kernels.compile_check` exits non-zero when a kernel needs more shared memory than the
    target has: against a limit of 32 B, the cross-entropy kernel at 50,272 words (16 warps, 64 B for
    its cross-warp reductions) is over it, its one-block launch at 1,000 words (16 B) fits."""
    script = ("import slm.kernels.compile_check as cc\n"
              "cc.SHARED_MEMORY[86] = 32\n"
              "cc.main(['86', '--ops', 'linear_cross_entropy', '--dtypes', 'bfloat16', "
              f"'--out', {str(tmp_path / 'over.json')!r}])\n")
    result = run_compiler(["-c", script])
    assert result.returncode != 0
    assert "kernels/compile_check.py: 3 of 6 kernels do not fit sm_86" in result.stderr, result.stderr[-2000:]
    over = [line for line in result.stdout.splitlines() if "OVER THE LIMIT" in line]
    assert len(over) == 3 and all("vocab=50272" in line for line in over), result.stdout
