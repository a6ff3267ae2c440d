"""Shared test fixtures: where ../shared lives, and Triton's interpreter on machines without a GPU."""

import os
from pathlib import Path

import pytest
import torch

# Kernel tests run through Triton's interpreter on CPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels import interpreter_fix  # Triton 3.6's interpreter vs numpy >= 2.4; see that module

    interpreter_fix.apply()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


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
