"""A training run's checkpoints: checkpoints/step_N under the run directory, each whole or absent.

    from slm.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
    save_checkpoint(run_dir, step=step, state=state, model=model, optimizers=optimizers, scaler=scaler,
                    config=asdict(cfg), rank=rank, world=world, keep=3)
    step, state = load_checkpoint(checkpoint_dirs(run_dir)[-1], model=model, optimizers=optimizers,
                                  scaler=scaler, loader=loader, rank=rank, device=device)

A checkpoint holds the weights (model.safetensors), every optimizer's state, the loss scaler's, the
trainer's state with the data loader's position, the run's settings and each rank's RNG, so a resumed
run logs the losses the unkilled run would have. train.py is their one writer and reader.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .data import PackedLoader


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint appears under its final name only once every
    file is written (see save_checkpoint), so a name that exists is a checkpoint that is whole."""
    root = run_dir / "checkpoints"
    return sorted(root.glob("step_[0-9]*")) if root.is_dir() else []


def save_checkpoint(run_dir: Path, *, step: int, state: dict, model, optimizers, scaler, config: dict,
                    rank: int, world: int, keep: int) -> Path:
    """Write into checkpoints/.tmp_step_N, then rename it to step_N: a killed run leaves either the
    whole checkpoint or a temp dir that resume ignores. Every rank saves its own RNG state."""
    root = run_dir / "checkpoints"
    tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    # Dropout is the only consumer of random numbers (the loader's order is a function of seed and epoch).
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        torch.save([optimizer.state_dict() for optimizer in optimizers], tmp / "optimizer.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    barrier(world)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)   # a re-run of the same step (resume past it)
        os.rename(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier(world)
    return final


def load_checkpoint(ckpt: Path, *, model, optimizers, scaler, loader: PackedLoader, rank: int,
                    device: torch.device) -> tuple[int, dict]:
    """Restore what save_checkpoint wrote: weights, optimizer states, loss scale, data position and this
    rank's RNG. Returns (step, trainer state). Each optimizer keeps this run's peak learning rate. A
    checkpoint that does not fit this run is a ValueError saying why."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
    saved = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    if isinstance(saved, dict):      # one optimizer's state saved bare, not in a list
        saved = [saved]
    if len(saved) != len(optimizers):
        raise ValueError(f"cannot resume {ckpt}: it holds {len(saved)} optimizer state(s), this run's "
                         f"--optimizer has {len(optimizers)}")
    for optimizer, optimizer_state in zip(optimizers, saved):
        peaks = [group["peak_lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(optimizer_state)   # this takes the checkpoint's param groups
        for group, peak in zip(optimizer.param_groups, peaks):
            group["peak_lr"] = peak      # this run's --lr / --muon-lr, as for every other setting
    scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    try:
        loader.load_state_dict(state.pop("loader"))
    except ValueError as err:
        raise ValueError(f"cannot resume {ckpt}: {err}") from None
    rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state.pop("step"), state


def barrier(world: int):
    if world > 1:
        dist.barrier()
