"""Conformance suite: every registered implementation of every kernel op against the op's reference.

    pytest tests/test_kernel_conformance.py                                 # every op, every implementation
    pytest tests/test_kernel_conformance.py --kernel layer_norm=triton      # one implementation only
    TRITON_INTERPRET=1 pytest -p my_kernels tests/test_kernel_conformance.py --kernel attention=mine

Your own kernel: a module on PYTHONPATH (`my_kernels` above) that runs `from slm import kernels` and
`kernels.register(op, name, fn)` with fn taking the reference's signature (kernels/registry.py); `-p` imports
it before the tests are collected (and before conftest.py can choose Triton's interpreter, hence
TRITON_INTERPRET=1 on a CPU), `--kernel` (repeatable) picks it. From Python:
`slm.kernels.testing.conformance_failures(op, name)` returns the list of failed checks, empty when the
implementation conforms.

The cases, the checks and the (atol, rtol) table are kernels/testing.py's (bench/op.py builds its inputs with
the same case builders): each case calls the implementation in the case's dtype and the reference on the
same values in fp32, and compares the output and every gradient; a failure prints the max and mean
difference. Tensors live on CUDA when present, else the CPU, where the Triton kernels run in Triton's
interpreter (tests/conftest.py) -- slow, so the shapes are small.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slm import kernels
from slm.kernels.testing import CASES, FP32, LAYER_NORM_CASES, PEERS, check_case, conformance_failures

REPO = Path(__file__).resolve().parents[1]


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
