"""Shared test setup: the device tests run on, the `gpu` and `slow` markers, and where ../shared lives.

On a machine with CUDA, tests that take the `device` fixture (or use DEVICE) put their tensors on the GPU
and the Triton kernels are compiled for it; without one they run on CPU through Triton's interpreter.

    pytest -m gpu         # the subset worth running on a GPU: kernels and the model through them
    pytest -m "not slow"  # the quick loop: all but the smoke training and gpu_check's dry run
"""

import os
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter is chosen when triton decorates the kernels, so it must be set before triton is imported.
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: worth running on a CUDA device (Triton kernels, the model through "
                                       "them); select with `pytest -m gpu`")
    config.addinivalue_line("markers", "slow: minutes of CPU (the smoke training, gpu_check's dry run); CI runs "
                                       "them, `pytest -m \"not slow\"` is the quick loop")


@pytest.fixture
def kernel_registry():
    """slm.kernels.register for one test: the registry's table is put back afterwards, so later tests in
    the same process see the shipped implementations only."""
    from slm.kernels import registry

    saved = {op: dict(names) for op, names in registry._TABLE.items()}
    yield registry.register
    registry._TABLE.clear()
    registry._TABLE.update(saved)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where test tensors live: the GPU when there is one, else the CPU (kernels through the interpreter)."""
    return torch.device(DEVICE)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip saying it is missing (tests need the real data there)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the shared data folder beside the repository")
    return path


@pytest.fixture(scope="session")
def opt_tokenizer():
    import slm

    return slm.load_tokenizer(shared_path("opt"))


def pytest_addoption(parser):
    # tests/test_kernel_conformance.py: check one implementation only, e.g. a user's registered kernel.
    parser.addoption("--kernel", action="append", default=[], metavar="OP=NAME",
                     help="run the kernel conformance suite for this implementation only (repeatable)")
