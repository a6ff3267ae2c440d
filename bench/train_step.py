"""Training-step throughput: train.py's step against transformers' OPTForCausalLM, in the same run.

    python bench/train_step.py                      # GPU: OPT-350M (random weights), T=2048, bf16
    python bench/train_step.py --small              # CPU: a small OPT in fp32 (ratios only)
    python bench/train_step.py --data DIR --json out.json
    python bench/train_step.py --kernels attention=triton,layer_norm=triton,linear_cross_entropy=triton

Ours: slm.OPT, packed rows of --seq-len tokens (varlen attention through cu_seqlens), the head applied
to trained positions only (train.micro_batch_loss), AdamW, sdpa and triton attention (one side each,
unless --kernels names the attention; its other ops as --kernels says, torch by default). The peer, as
TRL's SFTTrainer runs it without packing: transformers.OPTForCausalLM with attn_implementation="sdpa",
the same examples padded to the longest of each batch of --batch-size, full logits and cross-entropy
with ignore_index, AdamW. Both: autocast in --dtype, fp32 master weights, one micro-batch per
optimizer step, dropout as the config says, the same real-length mix: the shards' first --examples
examples (default: the ToolBench sample prepared with OPT's tokenizer), packed on our side and padded
per batch on the peer's, so both train on the same real tokens per pass.

Correctness first: with equal weights and dropout off, every side's loss per trained token over the
same examples must agree with the peer's (relative 1e-4 in fp32, 2e-2 in half precision), or nothing is
timed. Then each side runs --warmup untimed steps and --passes timed passes over all its batches: on a
GPU one side after the other (one model on the GPU at a time, so peak memory is each side's own), on
a CPU alternating pass by pass (a shared CPU's load drifts; both sides then see the same).
Throughput counts real (non-padding) tokens; MFU = FLOP/token x tokens/s / peak, with FLOP/token =
6*N_mm + 12*L*d*T (flops.flops_per_token) and the device's dense bf16/fp16 datasheet peak
(flops.PEAK_FLOPS: 989 TFLOP/s on an H100 SXM), also shown against the ~790 an 8192^3 bf16 matmul
reaches on an H100 in practice. A table is printed last, with the JSON beside it. From Python:
`run(config, dataset, {name: kernels}, dtype, ...)` returns that JSON's dict (bench/gpu_check.py calls it
once per dtype).
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402
from bench.harness import REPO  # noqa: E402

from slm import kernels  # noqa: E402
import slm  # noqa: E402
import train  # noqa: E402
from slm import flops, provenance  # noqa: E402
from slm.data import IGNORE_INDEX, PackedLoader, ShardDataset  # noqa: E402

SAMPLE = REPO.parent / "shared" / "toolbench" / "sft" / "toolllama_dfs_data_example.json"
SMALL = dict(vocab_size=50272, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
             word_embed_proj_dim=128, do_layer_norm_before=False)   # opt-350m's shape, scaled down
PEER = "transformers sdpa, padded"


def shards(data: str | None, tok, seq_len: int) -> ShardDataset:
    """The shards in `data`, or the ToolBench sample prepared with `tok` into a temporary directory."""
    if data:
        return ShardDataset(data, fingerprint=tok.fingerprint, max_len=seq_len)
    from data.prepare import prepare

    out = Path(tempfile.mkdtemp(prefix="bench_train_step_")) / "shards"
    prepare([SAMPLE], tok, out, max_len=seq_len, show_progress=False)
    return ShardDataset(out)


def batches(dataset, seq_len: int, batch_size: int, examples: int):
    """Our packed micro-batches and the peer's padded ones, over the same first `examples` examples."""
    chosen = list(range(min(examples, len(dataset))))
    packed = list(PackedLoader(dataset, seq_len=seq_len, rows=batch_size, seed=0, indices=chosen, epochs=1))
    padded = list(PackedLoader(dataset, seq_len=seq_len, rows=batch_size, seed=0, indices=chosen, mode="padded",
                               epochs=1))
    return packed, padded, len(chosen)


def peer_loss(model, b, device):
    """transformers' causal-LM loss: full logits, upcast, cross-entropy with ignore_index (summed)."""
    logits = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits
    targets = b.targets.to(device)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum"), int((targets != IGNORE_INDEX).sum())


def ours_loss(model, b, device):
    return train.micro_batch_loss(model, model, b, device)


class Side:
    """One implementation under test: its model, loss, micro-batches and optimizer, timed pass by pass."""

    def __init__(self, name, model, loss_fn, data, device, dtype):
        self.name, self.model, self.loss_fn, self.data = name, model, loss_fn, data
        self.device, self.seconds, self.passes = device, 0.0, 0
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.optimizer = None

    def loss_per_trained_token(self) -> float:
        """The loss over all its micro-batches, dropout off, divided by their trained tokens; the model
        visits the device for it."""
        self.model.to(self.device).eval()
        with torch.no_grad(), self.autocast:
            sums = [self.loss_fn(self.model, b, self.device) for b in self.data]
        self.model.cpu()
        return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)

    def step(self, b):
        with self.autocast:
            loss_sum, n = self.loss_fn(self.model, b, self.device)
        (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.3)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def start(self, warmup: int):
        self.model.to(self.device).train()
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.01,
                                               fused=self.device.type == "cuda")
        for b in self.data[:warmup]:
            self.step(b)

    def timed_pass(self):
        """One optimizer step per micro-batch over all of them (both sides hold the same real tokens)."""
        harness.sync(self.device)
        start = time.perf_counter()
        for b in self.data:
            self.step(b)
        harness.sync(self.device)
        self.seconds += time.perf_counter() - start
        self.passes += 1

    def result(self, flop_per_token, peak, peak_mem=None) -> dict:
        tokens = self.passes * sum(b.n_tokens for b in self.data)
        trained = self.passes * sum(b.n_trained for b in self.data)
        steps = self.passes * len(self.data)
        r = {"name": self.name, "steps": steps, "seconds": self.seconds, "tokens": tokens,
             "tok_s": tokens / self.seconds, "trained_tok_s": trained / self.seconds,
             "ms_per_step": 1e3 * self.seconds / steps, "peak_mem_gib": peak_mem}
        if peak:
            r["mfu"] = flop_per_token * r["tok_s"] / peak
            r["mfu_vs_790"] = flop_per_token * r["tok_s"] / flops.PRACTICAL_H100_FLOPS
        return r


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(sides: list[Side], device, passes: int, warmup: int, flop_per_token: float, peak) -> list[dict]:
    """Each side's result over `passes` timed passes after `warmup` steps: on a GPU one side after the other,
    one model there at a time (each side's peak memory is its own); on a CPU pass by pass in turn (a shared
    CPU's load drifts; both sides then see the same)."""
    if device.type != "cuda":
        for side in sides:
            side.start(warmup)
        for _ in range(passes):
            for side in sides:
                side.timed_pass()
        return [side.result(flop_per_token, peak) for side in sides]
    results = []
    for side in sides:
        free(device)
        side.start(warmup)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(passes):
            side.timed_pass()
        results.append(side.result(flop_per_token, peak, torch.cuda.max_memory_allocated(device) / 2**30))
        side.optimizer = None
        side.model.cpu()
    return results


def measure(sides: list[Side], device, dtype: str, seq_len: int, passes: int, warmup: int) -> dict:
    """The loss check over `sides` (the peer last), then, when every loss agrees with the peer's, the timing."""
    flop_per_token = flops.flops_per_token(sides[0].model, seq_len)
    peak = flops.peak_flops(device)
    losses = {side.name: side.loss_per_trained_token() for side in sides}
    reference = losses[sides[-1].name]
    tolerance = 1e-4 if dtype == "fp32" else 2e-2
    agree = all(abs(loss - reference) <= tolerance * abs(reference) for loss in losses.values())
    print(f"check ({dtype}): loss per trained token " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
          + f" ({'agree' if agree else 'DISAGREE'}, rel. tolerance {tolerance})")
    result = {"device": provenance.device_name(device), "commit": provenance.git_commit(),
              "gflop_per_token": flop_per_token / 1e9, "peak_tflops": peak and peak / 1e12,
              "loss_per_trained_token": losses, "loss_tolerance": tolerance, "losses_agree": agree, "rows": []}
    if agree:   # else the timings would compare different computations
        result["rows"] = timed(sides, device, passes, warmup, flop_per_token, peak)
        for row in result["rows"]:
            row["vs_transformers"] = row["tok_s"] / result["rows"][-1]["tok_s"]
    return result


def run(config, dataset, variants: dict[str, dict[str, str]], dtype: str = "bf16", seq_len: int = 2048,
        batch_size: int = 8, examples: int = 64, passes: int = 5, warmup: int = 3, device=None) -> dict:
    """Our OPT under each of `variants` ({name: kernels}) against transformers' (PEER), one random checkpoint
    of `config`, on the first `examples` examples of `dataset`: the loss check, then, when every side's
    loss per trained token agrees with the peer's, the timed rows ("vs_transformers": tokens/s over the
    peer's). The figures with the device, commit and versions, as plain data."""
    import transformers

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = train.DTYPES[dtype]
    packed, padded, n_examples = batches(dataset, seq_len, batch_size, examples)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_model_") as tmp:
        checkpoint = harness.random_checkpoint(config, Path(tmp))
        sides = [Side(name, slm.load_model(checkpoint, kernels=kernels), ours_loss, packed, device, torch_dtype)
                 for name, kernels in variants.items()]
        peer = transformers.OPTForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                           torch_dtype=torch.float32)
        sides.append(Side(PEER, peer, peer_loss, padded, device, torch_dtype))
        return measure(sides, device, dtype, seq_len, passes, warmup) | {
            "dtype": dtype, "seq_len": seq_len, "batch_size": batch_size, "examples": n_examples,
            "packed_micro_batches": len(packed), "padded_micro_batches": len(padded),
            "kernels": {side.name: side.model.kernels for side in sides[:-1]}, "torch": torch.__version__,
            "transformers": transformers.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a small OPT in fp32 on the CPU (ratios only)")
    p.add_argument("--data", help="shard directory from data/prepare.py (default: the ToolBench sample)")
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "opt"), help="OPT tokenizer directory")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (default 8; --small 2)")
    p.add_argument("--examples", type=int, default=None, help="examples both sides train on (default 64; --small 6)")
    p.add_argument("--passes", type=int, default=None, help="timed passes over them (default 5; --small 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --small 1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16; --small fp32")
    p.add_argument("--json", help="also write the results here")
    kernels.add_arguments(p, "layer_norm and linear_cross_entropy torch; attention: sdpa, and triton on cuda, "
                             "one side each")
    args = p.parse_args(argv)
    small = dict(batch_size=2, examples=6, passes=3, warmup=1, dtype="fp32")
    large = dict(batch_size=8, examples=64, passes=5, warmup=3, dtype="bf16")
    for key, value in (small if args.small else large).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    chosen = args.kernels or {}
    if "attention" in chosen:
        variants = {f"slm packed ({chosen['attention']})": chosen}
    else:
        variants = {"slm packed (sdpa)": {**chosen, "attention": "sdpa"}}
        if device.type == "cuda":
            variants["slm packed (triton)"] = {**chosen, "attention": "triton"}

    dataset = shards(args.data, slm.load_tokenizer(args.tokenizer), args.seq_len)
    config = slm.OPTConfig(**SMALL) if args.small else slm.OPTConfig.preset("opt-350m")
    report = run(config, dataset, variants, args.dtype, args.seq_len, args.batch_size, args.examples, args.passes,
                 args.warmup, device)
    report.update(command=" ".join(sys.argv),
                  model="opt-350m (random weights)" if not args.small else f"small OPT {SMALL}")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if not report["losses_agree"]:
        raise SystemExit("the two implementations disagree: timings would compare different computations")
    print(f"\n{report['device']} | commit {report['commit']} | {report['model']} | {args.dtype} | "
          f"T={args.seq_len} | {args.batch_size} rows/micro-batch")
    print(f"{'implementation':30s} {'tok/s':>10s} {'trained tok/s':>14s} {'ms/step':>9s} {'MFU':>7s} "
          f"{'peak GiB':>9s} {'vs peer':>8s}")
    for r in report["rows"]:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['name']:30s} {r['tok_s']:10,.0f} {r['trained_tok_s']:14,.0f} {r['ms_per_step']:9.1f} "
              f"{mfu:>7s} {mem:>9s} {r['vs_transformers']:7.2f}x")


if __name__ == "__main__":
    main()
