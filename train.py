"""Supervised fine-tuning of OPT on ToolBench tool-calling trajectories: the paper's recipe in one loop.

    python train.py --data data/toolbench --out runs/paper            # the paper's recipe (preset paper)
    python train.py --preset smoke --out runs/smoke                   # tiny, offline: 5-11 minutes on 2 CPU cores
    python train.py --data data/toolbench --out runs/paper --resume   # continue a killed run exactly
    torchrun --nproc_per_node=8 train.py --data data/toolbench --out runs/paper   # data-parallel

The recipe (arXiv 2512.15943): full fine-tune of facebook/opt-350m for one epoch of
ToolBench's DFS trajectories; AdamW (lr 5e-5, weight decay 0.01), 100 warmup steps then linear decay,
an effective batch of 32 rows, max grad norm 0.3, fp16 mixed precision with dynamic loss scaling.

What one optimizer step is. The paper's rows are step-exploded: a trajectory with k assistant turns
appears as k rows, each training only its last turn, so a paper step trains 32 assistant turns.
data/prepare.py collapses a trajectory into one example that trains all its turns (each once, as the
paper's rows together did), and we pack examples into rows of `max_len` tokens. The total of trained
tokens per epoch is unchanged; only the repeated context is gone. To keep the optimisation the same,
a step here holds as many trained turns as a paper step (32): with `--grad-accum auto` (the paper
preset) we measure trained turns per packed row on the data and take
    rows per step = 32 x packed rows / trained turns,   grad_accum = rows per step / batch_size,
so the number of optimizer steps per epoch, the schedule, and the trained tokens behind each update
match the paper's. The mapping is printed at start.

The loss is the cross-entropy of the trained targets, summed over every micro-batch of the step (on
every rank) and divided by their number of trained tokens: each trained token weighs the same however
the tokens fall into micro-batches, as with one big batch.

The smoke preset: copying from random init in CPU minutes. opt-350m arrives pretrained: the heads that
copy a name, a number or a function name from earlier in the context (induction heads) come from its
pretraining, and SFT only has to point them at the right places. A randomly initialised smoke model has
none, so the preset gives it four head starts, each measured in BENCHMARKS.md:
- a language-model warm-up (--lm-fraction): the first 30% of the steps train every token of the corpus,
  where each name recurs in the query, the thought, the call and the answer; the assistant turns alone
  (~20% of the tokens) are too weak a signal for copying to form. Then the turns only, as the paper;
  the eval loss is always that of the trained turns;
- a position table that starts from sine waves, so "one token back" is one linear map at every position;
- three of layer 0's four heads fitted at init to attend 1, 2 and 3 tokens back (`slm/smoke.py`),
  the first half of a copying circuit, which the model would otherwise take most of its budget to find;
- Muon (--optimizer muon) for the decoder's weight matrices, AdamW for the rest.

Kernels: every op runs through the registry (kernels/), chosen with `--kernels attention=triton,
layer_norm=triton,linear_cross_entropy=triton` (--attn NAME is the attention entry); the resolved choice is
printed at start and saved in train_config.json and each checkpoint's config. Attention defaults to
"triton" on CUDA and "sdpa" on CPU (`default_kernels`, the one place this is decided): on CUDA the packed
rows of training then go to our varlen kernel and never build a (T x T) mask; on CPU Triton would need
its interpreter, and SDPA is exact. The loss of the trained turns (and of the LM warm-up) is the
"linear_cross_entropy" op on the hidden states: "torch" materialises the trained tokens' logits,
"triton" never holds them. --activation-checkpointing recomputes each decoder layer in backward (the
same losses, less memory).

Out of memory: a step that runs out of device memory stops with one sentence naming the batch, the peak
so far, the flags that lower it and the last intact checkpoint, which --resume continues from.

Precision follows the device: on CUDA fp16 autocast with a dynamic loss scale (the paper's; --dtype
bf16 selectable), on CPU fp32; the weights and AdamW's state stay fp32. Under torchrun the global
batch is unchanged (--grad-accum is split among the processes) and so are the losses. A step whose
loss or gradient is not finite is skipped and counted; --max-bad-steps of them in a row stop the run.
--resume restores weights, optimizer, loss scale, schedule, RNG and data position from the latest
checkpoint, so a killed run logs, once resumed, the losses it would have logged.

Outputs in --out: train_config.json, metrics.jsonl (one JSON object per logged step, eval_loss entries),
loss.png (train and eval loss against the step, redrawn at each eval), checkpoints/step_XXXXXXXX/ (the last
--keep), and final/ (Hugging Face format with the tokenizer).
"""

import argparse
import json
import math
import os
import re
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import slm
from slm import flops, kernels, smoke
from slm.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from slm.data import IGNORE_INDEX, PackedLoader, ShardDataset, split_by_query
from slm.optimizers import make_optimizers, set_lr
from slm.plots import plot_loss
from slm.weights import resolve_checkpoint

# -------------------------------------------------------------------------------------------- config


OPTIMIZERS = ("adamw", "muon")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grad_accum_arg(text: str) -> int:
    """--grad-accum: a positive integer, or `auto` (stored as 0)."""
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return int(text)


def setting(default, help: str, **flag):
    """A TrainConfig field: its default, its --flag's help (the presets' values are appended to it) and
    any other add_argument settings (type, choices, action); flag=False for one without a --flag."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class TrainConfig:
    preset: str = setting("paper", "", flag=False)
    # what is trained on what
    model: str | None = setting("facebook/opt-350m", "HF checkpoint dir or hub id; unset: a random tiny OPT")
    tokenizer: str | None = setting(None, "dir with vocab.json + merges.txt; unset: the model's directory")
    data: str | None = setting(None, "shard directory written by data/prepare.py (smoke: generated in OUT/smoke)")
    out: str = setting("runs/paper", "run directory")
    resume: bool = setting(False, "continue from the latest intact checkpoint in OUT", action="store_true")
    # the paper's optimisation
    epochs: int = setting(1, "passes over the data", type=int)
    max_steps: int | None = setting(None, "optimizer steps to run; the LR schedule spans them (unset: the epochs')",
                                    type=int)
    batch_size: int = setting(8, "rows per micro-batch per process (packed: max_len tokens a row)", type=int)
    grad_accum: int = setting(0, "micro-batches per optimizer step over all processes, or 'auto' (0): as many "
                                 "trained turns per step as --paper-rows paper rows", type=grad_accum_arg)
    paper_rows: int = setting(32, "the paper's effective batch (8 x 4) in its step-exploded rows, which 'auto' "
                                  "matches", type=int)
    max_len: int = setting(2048, "tokens per row (OPT's positions); the shards must be fitted to it", type=int)
    packing: bool = setting(True, "pack examples into rows with varlen attention, or pad each batch "
                                  "(--no-packing)", action=argparse.BooleanOptionalAction)
    lr: float = setting(5e-5, "peak learning rate", type=float)
    warmup: int = setting(100, "linear warmup steps, then linear decay to 0", type=int)
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay; biases and LayerNorm weights are exempt",
                                  type=float)
    optimizer: str = setting("adamw", "adamw, or muon: Muon for the decoder's weight matrices and AdamW for the "
                                      "rest", choices=OPTIMIZERS)
    muon_lr: float = setting(0.005, "Muon's peak learning rate, on --lr's schedule", type=float)
    grad_clip: float = setting(0.3, "max global gradient norm", type=float)
    lm_fraction: float = setting(0.0, "share of the steps, first, trained on every token as language modelling",
                                 type=float)
    dtype: str | None = setting(None, "autocast precision; unset: fp16 on cuda, fp32 on cpu", choices=DTYPES)
    # machinery
    kernels: dict | None = setting(None, "", flag=False)   # {op: name} from --kernels/--attn; default_kernels
                                                           # resolves every op at start
    activation_checkpointing: bool = setting(False, "recompute each decoder layer in backward instead of keeping "
                                                    "its activations (less memory)", action="store_true")
    device: str | None = setting(None, "unset: cuda when available", choices=("cpu", "cuda"))
    seed: int = setting(0, "seed of init, data order, dropout and eval split", type=int)
    eval_fraction: float = setting(0.01, "share of queries held out for eval loss (0: no eval)", type=float)
    eval_every: int = setting(500, "eval loss every N steps and at the end", type=int)
    log_every: int = setting(10, "a log line and a metrics.jsonl entry every N steps", type=int)
    save_every: int = setting(500, "a checkpoint every N steps and at the end", type=int)
    keep: int = setting(2, "checkpoints to keep", type=int)
    max_bad_steps: int = setting(20, "consecutive non-finite steps that stop the run", type=int)
    smoke_tasks: int = setting(200, "smoke preset: synthetic training tasks to generate", type=int)


PRESETS = {
    "paper": TrainConfig(),
    # Needs no download: a tiny random OPT, a BPE tokenizer trained on the synthetic corpus, synthetic
    # tasks prepared by data/prepare.py; 5 to 11 minutes on 2 CPU cores. The loop is the paper's.
    "smoke": TrainConfig(preset="smoke", model=None, out="runs/smoke", batch_size=4, grad_accum=1,
                         max_len=512, epochs=1, lr=3e-3, warmup=50, grad_clip=1.0, lm_fraction=0.3,
                         optimizer="muon", eval_fraction=0.02, eval_every=200, log_every=20, save_every=200,
                         smoke_tasks=13500),
}


def parse_args(argv=None) -> TrainConfig:
    """A TrainConfig from the command line: one flag per field, each unset flag taking the preset's value."""
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="paper", help="base settings (default paper)")
    for f in fields(TrainConfig):
        flag = dict(f.metadata)
        if not flag.pop("flag", True):
            continue
        values = {name: getattr(preset, f.name) for name, preset in PRESETS.items()}
        shown = {name: "unset" if v is None else v for name, v in values.items()}
        presets = (f"default {shown['paper']}" if len(set(map(str, shown.values()))) == 1
                   else ", ".join(f"{name} {v}" for name, v in shown.items()))
        flag["help"] = f"{flag['help']} ({presets})"
        p.add_argument("--" + f.name.replace("_", "-"), default=None, **flag)   # None: the preset's value
        if f.name == "dtype":   # the kernel flags sit with the other machinery
            kernels.add_arguments(p, "attention triton on cuda, sdpa on cpu; layer_norm and linear_cross_entropy "
                                     "torch")
    args = vars(p.parse_args(argv))
    return replace(PRESETS[args.pop("preset")], **{k: v for k, v in args.items() if v is not None})


# ------------------------------------------------------------------------- schedule, loss, steps, FLOPs


def fail(message: str):
    """Stop before (or instead of) training with a sentence for the user; exit status 1."""
    raise SystemExit(f"train.py: error: {message}")


def default_kernels(cfg: TrainConfig, device: torch.device) -> dict[str, str]:
    """Every op's implementation: those --kernels and --attn named (checked when parsed), then the
    defaults. Attention defaults to "triton" on CUDA (packed rows through our varlen kernel, never a
    T x T mask) and to "sdpa" on CPU (exact, and fast where Triton would need its interpreter)."""
    attention = "triton" if device.type == "cuda" else "sdpa"
    return {**slm.model.DEFAULT_KERNELS, "attention": attention, **(cfg.kernels or {})}


def peak_memory_gib(device: torch.device) -> float:
    """The peak memory of this process so far: allocated on the GPU, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of update number `step` (0-based): linear warmup from 0, then linear to 0.

    This is transformers' get_linear_schedule_with_warmup, which the paper's SFTTrainer used; as there,
    the first update has lr 0.
    """
    if step < cfg.warmup:
        return cfg.lr * step / cfg.warmup
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup))


def trained_token_loss(hidden, positions, labels, head_weight, linear_cross_entropy) -> torch.Tensor:
    """Summed cross-entropy of the trained targets: hidden (B, T, e) -> a scalar.

    positions: flat indices into the B*T tokens whose target is trained; labels: their targets.
    linear_cross_entropy: the registry's op (the model's `kernel("linear_cross_entropy")`), which applies
    the tied head (vocab x e) at those positions only. In ToolBench rows under 10% of the tokens are
    trained (system prompt, queries and observations carry no loss), so full logits would spend most of
    the head's FLOPs, and B*T*50272 floats of memory (3.3 GB for 8x2048 in fp32), on numbers the loss
    ignores; the "triton" implementation does not even hold the trained tokens' logits.
    """
    h = hidden.flatten(0, 1).index_select(0, positions)          # (n_trained, e)
    return linear_cross_entropy(h, head_weight, labels, reduction="sum")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`. A host-to-GPU copy is asynchronous only from pinned (page-locked) memory, so on CUDA
    the batch is pinned first and `non_blocking=True` lets the copy overlap the previous step's kernels."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def micro_batch_loss(model, raw_model: slm.OPT, b, device, lm: bool = False) -> tuple[torch.Tensor, int]:
    """Summed loss of one micro-batch (a slm.data.Batch) and its number of trained targets.

    `model` may be the DDP wrapper (whose forward synchronises gradients) of `raw_model`, whose tied embedding
    and loss kernel give the loss. lm: every next token is a target, not only the trained turns.
    """
    targets = b.lm_targets if lm else b.targets
    trained = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # on the CPU: no GPU sync
    labels = targets.flatten()[trained]
    input_ids = to_device(b.input_ids, device)
    if b.cu_seqlens is not None:   # packed rows: sequences given by cu_seqlens, attention never crosses
        hidden = model(input_ids, cu_seqlens=to_device(b.cu_seqlens, device), max_seqlen=b.max_seqlen,
                       return_hidden=True)
    else:                          # padded rows
        hidden = model(input_ids, attention_mask=to_device(b.attention_mask, device), return_hidden=True)
    loss = trained_token_loss(hidden, to_device(trained, device), to_device(labels, device), raw_model.lm_head_weight,
                              raw_model.kernel("linear_cross_entropy"))
    return loss, len(labels)


def optimizer_steps(loader: PackedLoader, accum: int):
    """Yield (micro-batches of one optimizer step, loader position after them), forever.

    A step never crosses an epoch boundary: the last step of an epoch takes what is left. Each process
    count pads an epoch's tail with its own number of filler rows, so this is what makes the rows of
    every step the same for 1 or N processes. The position is what a checkpoint stores; a micro-batch
    read ahead from the next epoch is not part of it, so a resumed run reads it again.
    """
    batches = iter(loader)
    carry = None   # (batch, epoch) read ahead: the first micro-batch of the next epoch
    while True:
        micro, epoch = ([carry[0]], carry[1]) if carry else ([], None)
        carry, position = None, None
        while len(micro) < accum:
            before = loader.state_dict()
            b = next(batches)
            if epoch is not None and loader.epoch != epoch:
                carry, position = (b, loader.epoch), before
                break
            micro.append(b)
            epoch = loader.epoch
        yield micro, position or loader.state_dict()


def log_line(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ phases
# main() runs these in order: setup, tokenizer, data, model, optimizer, resume, loop, summary.


@dataclass
class Process:
    """This process: torchrun's world, its rank, its device and precision."""

    world: int
    rank: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype

    @property
    def master(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def setup(cfg: TrainConfig) -> tuple[Process, Path]:
    """Process and device, precision, and a writable run directory that is not another run's."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device")
    device = torch.device(cfg.device, local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if world > 1:
        # torchrun: one process per GPU (nccl) or CPU worker (gloo), gradients averaged by DDP.
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg.dtype = cfg.dtype or ("fp16" if device.type == "cuda" else "fp32")
    cfg.kernels = default_kernels(cfg, device)
    torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls on GPU: TF32 tensor cores
    torch.backends.cudnn.allow_tf32 = True

    run_dir = Path(cfg.out)
    try:  # an unwritable run directory is found now, not at the first checkpoint
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_rank{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        fail(f"--out {run_dir} is not a writable directory ({err.strerror})")
    checkpoints = checkpoint_dirs(run_dir)
    if checkpoints and not cfg.resume:
        fail(f"{run_dir} already holds checkpoints ({checkpoints[-1].name}): pass --resume to continue "
             "that run, or choose another --out")
    return Process(world, rank, local_rank, device, DTYPES[cfg.dtype]), run_dir


def load_tokenizer_for(cfg: TrainConfig, process: Process, run_dir: Path):
    """The model's tokenizer, or (smoke) the one trained on the generated corpus, with its data."""
    if cfg.tokenizer is None and cfg.model is not None:
        try:
            cfg.tokenizer = str(resolve_checkpoint(cfg.model))
        except slm.CheckpointError as err:
            fail(f"--model: {err}")
    if cfg.preset == "smoke" and cfg.data is None:
        smoke.smoke_data(cfg, run_dir / "smoke", process.master, process.world)   # sets cfg.data (and cfg.tokenizer if unset)
    if cfg.tokenizer is None:
        fail("a randomly initialised model needs --tokenizer DIR")
    try:
        return slm.load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as err:
        fail(f"tokenizer: {err}")


@dataclass
class Data:
    """The loaders and the step arithmetic of the run (see the module docstring)."""

    stats: dict
    train_idx: list
    eval_idx: list
    loader: PackedLoader
    eval_batches: list
    mode: str
    rows_per_epoch: int
    turns: float            # trained turns of the training split
    paper_steps: float      # the paper's optimizer steps for them
    accum: int              # micro-batches per step on this process
    steps_per_epoch: int
    total_steps: int
    lm_steps: int           # the first steps, trained as language modelling


def load_data(cfg: TrainConfig, tok, process: Process) -> Data:
    """The shards, split by query into train / held-out, and how many micro-batches make a step."""
    if cfg.data is None:
        fail("--data DIR is required: the shard directory written by data/prepare.py")
    try:
        dataset = ShardDataset(cfg.data, fingerprint=tok.fingerprint, max_len=cfg.max_len)
    except FileNotFoundError as err:
        fail(f"--data: {err}")
    except ValueError as err:
        fail(f"--data {cfg.data} does not fit this run (tokenizer {cfg.tokenizer}, --max-len {cfg.max_len}): {err}")
    train_idx, eval_idx = split_by_query(dataset, cfg.eval_fraction, cfg.seed)
    if len(train_idx) == 0:
        fail(f"--data {cfg.data} holds no training examples")
    mode = "packed" if cfg.packing else "padded"
    world, rank = process.world, process.rank
    # Each process reads its own slice of every global micro-batch; with the same global batch the
    # steps see the same rows whatever the number of processes.
    loader = PackedLoader(dataset, seq_len=cfg.max_len, rows=cfg.batch_size, seed=cfg.seed,
                          indices=train_idx, mode=mode, rank=rank, world_size=world, epochs=None)
    # The held-out split is small (1% of queries): its batches are built once and kept.
    eval_batches = list(PackedLoader(dataset, seq_len=cfg.max_len, rows=cfg.batch_size, seed=cfg.seed,
                                     indices=eval_idx, mode=mode, rank=rank, world_size=world, epochs=1)
                        ) if len(eval_idx) else []
    stats = dataset.stats
    rows_per_epoch = len(loader) * cfg.batch_size * world
    # Trained turns of the training split: each paper row trains exactly one turn (see the docstring).
    turns = stats["trained_turns"] * len(train_idx) / len(dataset)
    paper_steps = turns / cfg.paper_rows
    if cfg.grad_accum == 0:
        cfg.grad_accum = max(world, round(rows_per_epoch / paper_steps / cfg.batch_size / world) * world)
    if cfg.grad_accum % world:
        fail(f"--grad-accum {cfg.grad_accum} is not divisible by the {world} processes: the global batch "
             "is split evenly (choose a multiple, or change --batch-size)")
    accum = cfg.grad_accum // world
    steps_per_epoch = -(-len(loader) // accum)            # the last step of an epoch may be short
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if total_steps < 1:
        fail(f"nothing to train: {total_steps} steps (--epochs {cfg.epochs}, --max-steps {cfg.max_steps})")
    if not 0.0 <= cfg.lm_fraction <= 1.0:
        fail(f"--lm-fraction {cfg.lm_fraction} is not a share between 0 and 1")
    return Data(stats, train_idx, eval_idx, loader, eval_batches, mode, rows_per_epoch, turns, paper_steps,
                accum, steps_per_epoch, total_steps, round(cfg.lm_fraction * total_steps))


def build_model(cfg: TrainConfig, tok, process: Process):
    """(the model to call, which is DDP's wrapper under torchrun, and the model itself)."""
    torch.manual_seed(cfg.seed)
    if cfg.model is None:
        vocab = -(-tok.vocab_size // 8) * 8   # padded to a multiple of 8, as OPT's 50272
        model = smoke.model(vocab, cfg.seed, kernels=cfg.kernels, activation_checkpointing=cfg.activation_checkpointing)
    else:
        try:
            model = slm.load_model(cfg.model, dtype=torch.float32, device="cpu", kernels=cfg.kernels,
                                   activation_checkpointing=cfg.activation_checkpointing)
        except (slm.CheckpointError, ValueError, OSError) as err:
            fail(f"--model: {err}")
    if tok.vocab_size > model.config.vocab_size:
        fail(f"tokenizer {cfg.tokenizer} has {tok.vocab_size} ids but the model's embedding only "
             f"{model.config.vocab_size}: they do not belong together")
    if cfg.max_len > model.config.max_position_embeddings:
        fail(f"--max-len {cfg.max_len} exceeds the model's {model.config.max_position_embeddings} positions")
    model.to(process.device).train()           # fp32 master weights; autocast computes in cfg.dtype
    raw_model = model
    if process.world > 1:
        # gradient_as_bucket_view: the .grad tensors are views into DDP's all-reduce buckets, not a second copy.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[process.local_rank] if process.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    torch.manual_seed(cfg.seed + process.rank)  # dropout differs per process, as the data does
    return model, raw_model


def resume(cfg: TrainConfig, process: Process, run_dir: Path, model, optimizers, scaler, loader) -> tuple[int, dict]:
    """(step, trainer state) from the latest checkpoint with --resume, else a fresh start; and metrics.jsonl
    made to hold exactly the lines of the steps done."""
    step, state = 0, {"skipped_steps": 0, "tokens": 0, "trained_tokens": 0}
    metrics_path = run_dir / "metrics.jsonl"
    checkpoints = checkpoint_dirs(run_dir)
    if cfg.resume and checkpoints:
        ckpt = checkpoints[-1]
        try:
            step, state = load_checkpoint(ckpt, model=model, optimizers=optimizers, scaler=scaler, loader=loader,
                                          rank=process.rank, device=process.device)
        except ValueError as err:
            fail(str(err))
        saved = json.loads((ckpt / "config.json").read_text())
        changed = {k: (saved[k], v) for k, v in asdict(cfg).items()
                   if k in saved and saved[k] != v and k not in ("resume", "max_steps", "out")}
        if changed:
            process.say(f"warning: resuming with settings that differ from the checkpoint's: {changed}")
        if process.master:  # the killed run may have logged past its last checkpoint: those lines go
            kept = [line for line in metrics_path.read_text().splitlines()
                    if json.loads(line)["step"] <= step] if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in kept))
        process.say(f"resumed from {ckpt} at step {step}")
    elif cfg.resume:
        process.say(f"--resume: no checkpoint in {run_dir}; starting from scratch")
    if process.master and step == 0:
        metrics_path.write_text("")
    if process.master:
        (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    return step, state


def describe(cfg: TrainConfig, process: Process, data: Data, model, flop_per_token: float):
    """The resolved config, the data, what one step holds and the model, printed at start."""
    rows_per_step = cfg.batch_size * cfg.grad_accum
    stats = data.stats
    process.say("config " + json.dumps(asdict(cfg)))
    process.say(f"data: {len(data.train_idx)} train / {len(data.eval_idx)} held-out examples from {stats['rows_used']} "
              f"rows ({stats['trained_turns']} trained turns); {data.rows_per_epoch} {data.mode} rows of "
              f"{cfg.max_len} per epoch")
    process.say(f"step: {cfg.batch_size} rows x {cfg.grad_accum} micro-batches ({process.world} process(es)) = "
              f"{rows_per_step} {data.mode} rows, holding {rows_per_step * data.turns / data.rows_per_epoch:.1f} "
              f"trained turns on average = as many paper rows (paper: {cfg.paper_rows}); {data.steps_per_epoch} "
              f"steps/epoch (paper-equivalent: {data.paper_steps:.0f}), {data.total_steps} steps in all")
    process.say(f"model: {model.num_parameters():,} parameters, {flop_per_token / 1e9:.3f} GFLOP/token, "
              f"{cfg.dtype} on {process.device}, kernels "
              + ",".join(f"{op}={name}" for op, name in model.kernels.items())
              + (", activation checkpointing" if model.activation_checkpointing else ""))


def eval_loss(model, raw_model, eval_batches: list, autocast, process: Process) -> float:
    """Mean loss per trained token over the held-out split (every process takes its share)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=process.device)   # (loss sum, trained tokens)
    with torch.no_grad(), autocast:
        for b in eval_batches:
            loss_sum, n = micro_batch_loss(raw_model, raw_model, b, process.device)
            total += torch.stack([loss_sum.double(), torch.tensor(float(n), device=process.device)])
    if process.world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train_step(micro: list, lm: bool, lr: float, model, raw_model, optimizers, scaler, autocast, cfg: TrainConfig,
               process: Process) -> dict:
    """One optimizer step over its micro-batches: {loss, gnorm, finite, tokens, trained}.

    The loss is normalised by the trained tokens of the whole step, on every process (known before
    backward). A step whose loss or gradient is not finite leaves the weights alone.

    One host sync per step here, the `.tolist()` below (the Triton cross-entropy adds one per micro-batch:
    it checks its targets' range before its kernels run): whether to apply the update depends on the loss
    and gradient norm being finite, which only the host can decide, so they are read together (with the
    step's token counts under DDP). Everything else is queued without waiting: the trained-token count
    comes from the batches' metadata on the host, and under DDP its all-reduced sum stays on the device,
    where it normalises the loss. (GradScaler.step syncs once more for an optimizer without a fused
    fp16 step, i.e. Muon under --dtype fp16; AdamW on CUDA is fused. With --no-packing the model checks
    a batch for padding, one more.)"""
    world, device = process.world, process.device
    # In language modelling every input token has its next token as target: n_tokens of them.
    counts = [sum(b.n_tokens if lm else b.n_trained for b in micro), sum(b.n_tokens for b in micro)]
    if world > 1:
        counts = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        # DDP averages over processes; x world turns that back into the step's sum.
        scale = (world / counts[0].clamp(min=1)).float()
    else:
        scale = 1 / max(counts[0], 1)
    loss_total = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        # DDP all-reduces gradients only on the last micro-batch; the others accumulate locally.
        sync = i == len(micro) - 1 or world == 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                loss_sum, _ = micro_batch_loss(model, raw_model, b, device, lm)
            scaler.scale(loss_sum * scale).backward()
        loss_total += loss_sum.detach()
    if world > 1:
        dist.all_reduce(loss_total)
    for optimizer in optimizers:
        scaler.unscale_(optimizer)       # true gradients, for clipping (no-op unless fp16)
    gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
    set_lr(optimizers, lr, cfg.lr)       # every group follows the schedule from its own peak
    read = torch.stack([loss_total.double(), gnorm.double()])
    step_loss, gnorm, *summed_counts = (torch.cat([read, counts]) if world > 1 else read).tolist()   # the sync
    step_trained, step_tokens = map(int, summed_counts) if world > 1 else counts
    loss_value = step_loss / max(step_trained, 1)
    # Every process decides alike: gnorm comes from all-reduced gradients, loss_total was all-reduced.
    finite = math.isfinite(loss_value) and math.isfinite(gnorm)
    if finite:
        for optimizer in optimizers:
            scaler.step(optimizer)
    scaler.update()                      # fp16: halves the scale after an overflow, grows it later
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_value, "gnorm": gnorm, "finite": finite, "tokens": step_tokens, "trained": step_trained}


class Meter:
    """Throughput since the last log line, and the peak memory so far."""

    def __init__(self, state: dict, device: torch.device):
        self.device = device
        self.t_last, self.tokens_last, self.trained_last = time.perf_counter(), state["tokens"], state["trained_tokens"]

    def read(self, state: dict) -> tuple[float, float, float]:
        """(tokens/s, trained tokens/s, peak memory in GiB)."""
        now = time.perf_counter()
        dt = now - self.t_last
        tok_s = (state["tokens"] - self.tokens_last) / dt
        trained_s = (state["trained_tokens"] - self.trained_last) / dt
        self.t_last, self.tokens_last, self.trained_last = now, state["tokens"], state["trained_tokens"]
        return tok_s, trained_s, peak_memory_gib(self.device)


def step_log(step: int, lm: bool, lr: float, result: dict, state: dict, meter: Meter, flop_per_token: float,
             peak: float | None) -> tuple[dict, str]:
    """A logged step's metrics.jsonl record and its log line (MFU only on a GPU whose peak is known)."""
    tok_s, trained_s, mem = meter.read(state)
    loss, gnorm = result["loss"], result["gnorm"]
    record = {"step": step, "loss": loss, "objective": "lm" if lm else "turns",
              "lr": lr, "gnorm": gnorm, "tok_s": tok_s, "trained_tok_s": trained_s,
              "peak_mem_gib": mem, "skipped_steps": state["skipped_steps"]}
    mfu = ""
    if peak:
        record["mfu"] = flop_per_token * tok_s / peak
        mfu = f" | mfu {record['mfu']:.1%}"
    line = (f"step {step:6d} | {'lm ' if lm else ''}loss {loss:.4f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
            f"tok/s {tok_s:,.0f} | trained tok/s {trained_s:,.0f}{mfu} | mem {mem:.2f} GiB"
            + (f" | skipped {state['skipped_steps']}" if state["skipped_steps"] else ""))
    return record, line


def out_of_memory(err: torch.OutOfMemoryError, step: int, cfg: TrainConfig, data: Data, process: Process,
                  run_dir: Path) -> str:
    """The sentence a step that ran out of device memory stops with: what was asked, what lowers it, and
    where the run continues from."""
    last = checkpoint_dirs(run_dir)
    where = (f"--resume continues from the last intact checkpoint, {last[-1]}" if last else
             "no checkpoint was written yet, so the run starts over")
    asked = re.search(r"Tried to allocate [\d.]+ \w+", str(err))   # torch's message runs to a paragraph
    return (f"step {step} ran out of {process.device.type} memory{f' ({asked[0]})' if asked else ''}"
            f" with micro-batches of {cfg.batch_size} rows x {cfg.max_len} tokens, {data.accum} of them a step, "
            f"and a peak of {peak_memory_gib(process.device):.2f} GiB so far; lower it with --activation-checkpointing "
            f"or --kernels linear_cross_entropy=triton ({where}), or with a smaller --batch-size and a larger "
            f"--grad-accum in a new --out (the data position depends on the batch size)")


# ------------------------------------------------------------------------------------------- main


def main(argv=None):
    cfg = parse_args(argv)
    process, run_dir = setup(cfg)
    tok = load_tokenizer_for(cfg, process, run_dir)
    data = load_data(cfg, tok, process)
    model, raw_model = build_model(cfg, tok, process)

    optimizers = make_optimizers(raw_model, cfg, fused=process.device.type == "cuda")
    # fp16 needs dynamic loss scaling (gradients underflow otherwise); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(process.device.type, enabled=cfg.dtype == "fp16")
    autocast = torch.autocast(process.device.type, dtype=process.amp_dtype, enabled=cfg.dtype != "fp32")

    step, state = resume(cfg, process, run_dir, raw_model, optimizers, scaler, data.loader)
    metrics_path, loss_png = run_dir / "metrics.jsonl", run_dir / "loss.png"
    flop_per_token = flops.flops_per_token(raw_model, cfg.max_len)
    peak = flops.peak_flops(process.device)
    describe(cfg, process, data, raw_model, flop_per_token)

    # ------------------------------------------------------------------------------------ training
    steps = optimizer_steps(data.loader, data.accum)
    bad_in_a_row, last_eval, loss_value = 0, None, float("nan")
    t_start = time.perf_counter()
    meter = Meter(state, process.device)
    step_start, tokens_start = step, state["tokens"]
    bar = tqdm(total=data.total_steps, initial=step, disable=not process.master, unit="step", dynamic_ncols=True)
    while step < data.total_steps:
        micro, position = next(steps)
        lm = step < data.lm_steps
        lr = lr_at(step, cfg, data.total_steps)
        try:
            result = train_step(micro, lm, lr, model, raw_model, optimizers, scaler, autocast, cfg, process)
        except torch.OutOfMemoryError as err:
            bar.close()
            fail(out_of_memory(err, step + 1, cfg, data, process, run_dir))
        loss_value, gnorm = result["loss"], result["gnorm"]
        # The schedule advances after a skipped step too, as in transformers' Trainer after an fp16 overflow.
        bad_in_a_row = 0 if result["finite"] else bad_in_a_row + 1
        state["skipped_steps"] += not result["finite"]
        step += 1
        state["tokens"] += result["tokens"]
        state["trained_tokens"] += result["trained"]
        bar.update()
        if bad_in_a_row >= cfg.max_bad_steps:
            last = checkpoint_dirs(run_dir)
            bar.close()
            fail(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (step {step}: loss "
                 f"{loss_value}, grad norm {gnorm}); stopping. The last good checkpoint is "
                 f"{last[-1] if last else 'none (no checkpoint was written yet)'}; try a lower --lr or --dtype bf16")

        # ------------------------------------------------------------------------ log, eval, save
        if step % cfg.log_every == 0 or step == data.total_steps:
            record, line = step_log(step, lm, lr, result, state, meter, flop_per_token, peak)
            if process.master:
                log_line(metrics_path, record)
                bar.write(line)
        if data.eval_batches and (step % cfg.eval_every == 0 or step == data.total_steps):
            last_eval = eval_loss(model, raw_model, data.eval_batches, autocast, process)
            if process.master:
                log_line(metrics_path, {"step": step, "eval_loss": last_eval})
                bar.write(f"step {step:6d} | eval_loss {last_eval:.4f}")
                plot_loss(metrics_path, loss_png)
        if step % cfg.save_every == 0 or step == data.total_steps:
            save_checkpoint(run_dir, step=step, state={"step": step, "loader": position, **state}, model=raw_model,
                            optimizers=optimizers, scaler=scaler, config=asdict(cfg), rank=process.rank, world=process.world,
                            keep=cfg.keep)
    bar.close()

    # ------------------------------------------------------------------------------ export, summary
    if process.master:
        plot_loss(metrics_path, loss_png)
        tmp, final = run_dir / "final.tmp", run_dir / "final"
        shutil.rmtree(tmp, ignore_errors=True)
        slm.save_model(raw_model, tmp, tokenizer=tok)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    elapsed = time.perf_counter() - t_start
    process.say(f"done: {step} steps ({step - step_start} this run) in {elapsed:.1f} s | last loss {loss_value:.4f}"
              + (f" | eval_loss {last_eval:.4f}" if last_eval is not None else "")
              + f" | {state['tokens']:,} tokens, {state['trained_tokens']:,} trained | "
              f"{(state['tokens'] - tokens_start) / elapsed:,.0f} tok/s this run | skipped steps "
              f"{state['skipped_steps']} | exported {run_dir / 'final'} | loss curve {loss_png}")
    if process.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
