"""What every bench script shares: its start (the import path, Triton's interpreter without a GPU),
waiting for the device before reading a clock, and a random checkpoint to compare libraries on.

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
    from bench import harness  # noqa: E402
    harness.interpret_without_gpu()     # before triton is first imported
    harness.sync(device)                # before and after a timed region
    harness.random_checkpoint(slm.OPTConfig.preset("opt-350m"), directory)   # for slm and transformers

Run as `python bench/NAME.py`, a script has bench/ on sys.path, where a script's name shadows any package
of that name (a bench/kernels.py would take `kernels` from Hugging Face's package, which transformers
imports): importing this module takes bench/ off sys.path.
"""

import os
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCH]


def interpret_without_gpu() -> None:
    """Without CUDA the Triton kernels run in Triton's interpreter, which is chosen when triton is first
    imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def sync(device: torch.device | str) -> None:
    """Wait for the queued work of a CUDA device (a no-op elsewhere), so a clock read after it counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def random_checkpoint(config, directory: Path, tokenizer=None) -> Path:
    """An OPT of `config` with seed-0 random weights, saved in Hugging Face's layout to `directory`, so that
    slm.load_model and transformers' from_pretrained load the same weights."""
    import slm   # here, not at the top: slm imports triton, which must come after interpret_without_gpu

    model = slm.OPT(config)
    model.init_weights(seed=0)
    return slm.save_model(model, directory, tokenizer=tokenizer)
