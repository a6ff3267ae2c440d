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

Correctness first: with equal weights and dropout off, both sides' loss over the same examples must
agree. Then each side runs --warmup untimed steps and --passes timed passes over all its batches: on a
GPU one side after the other (one model on the GPU at a time, so peak memory is each side's own), on
a CPU alternating pass by pass (a shared CPU's load drifts; both sides then see the same).
Throughput counts real (non-padding) tokens; MFU = FLOP/token x tokens/s / peak, with FLOP/token =
6*N_mm + 12*L*d*T (flops.flops_per_token) and the device's dense bf16/fp16 datasheet peak
(flops.PEAK_FLOPS: 989 TFLOP/s on an H100 SXM), also shown against the ~790 an 8192^3 bf16 matmul
reaches on an H100 in practice. A table is printed
last, with the JSON beside it.
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


def shards(args, tok) -> ShardDataset:
    if args.data:
        return ShardDataset(args.data, fingerprint=tok.fingerprint, max_len=args.seq_len)
    from data.prepare import prepare

    out = Path(tempfile.mkdtemp(prefix="bench_train_step_")) / "shards"
    prepare([SAMPLE], tok, out, max_len=args.seq_len, show_progress=False)
    return ShardDataset(out)


def batches(dataset, args):
    """Our packed micro-batches and the peer's padded ones, over the same first --examples examples."""
    examples = list(range(min(args.examples, len(dataset))))
    packed = list(PackedLoader(dataset, seq_len=args.seq_len, rows=args.batch_size, seed=0,
                               indices=examples, epochs=1))
    padded = list(PackedLoader(dataset, seq_len=args.seq_len, rows=args.batch_size, seed=0,
                               indices=examples, mode="padded", epochs=1))
    return packed, padded, len(examples)


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

    def __init__(self, name, model, loss_fn, data, device, dtype, attn=None):
        self.name, self.model, self.loss_fn, self.data, self.attn = name, model, loss_fn, data, attn
        self.device, self.seconds, self.passes = device, 0.0, 0
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.optimizer = None

    def step(self, b):
        with self.autocast:
            loss_sum, n = self.loss_fn(self.model, b, self.device)
        (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.3)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def start(self, warmup: int):
        self.model.to(self.device).train()
        if self.attn:
            self.model.set_attn(self.attn)
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
    dtype = train.DTYPES[args.dtype]
    transformers = __import__("transformers")

    tok = slm.load_tokenizer(args.tokenizer)
    packed, padded, n_examples = batches(shards(args, tok), args)
    config = slm.OPTConfig(**SMALL) if args.small else slm.OPTConfig.preset("opt-350m")
    device_name = provenance.device_name(device)
    peak = flops.peak_flops(device)

    # One set of random weights for both sides, through a Hugging Face checkpoint on disk.
    torch.manual_seed(0)
    ours = slm.OPT(config, kernels=args.kernels)
    ours.init_weights(seed=0)
    checkpoint = Path(tempfile.mkdtemp(prefix="bench_train_step_model_"))
    slm.save_model(ours, checkpoint)
    ours.to(device)
    flop_per_token = flops.flops_per_token(ours, args.seq_len)
    peer = transformers.OPTForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                       torch_dtype=torch.float32).to(device)

    # ---- correctness: equal loss per trained token over the same examples, dropout off
    ours.eval(), peer.eval()
    sums = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for name, model, fn, data in (("ours", ours, ours_loss, packed), ("peer", peer, peer_loss, padded)):
            total = [fn(model, b, device) for b in data]
            sums[name] = sum(float(s) for s, _ in total) / sum(n for _, n in total)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    agree = abs(sums["ours"] - sums["peer"]) <= tolerance * abs(sums["peer"])
    print(f"check: loss per trained token ours {sums['ours']:.6f} vs transformers {sums['peer']:.6f} "
          f"({'agree' if agree else 'DISAGREE'}, rel. tolerance {tolerance})")
    if not agree:
        raise SystemExit("the two implementations disagree: timings would compare different computations")

    # ---- timing
    if "attention" in (args.kernels or {}):
        sides = [Side(f"slm packed ({args.kernels['attention']})", ours, ours_loss, packed, device, dtype)]
    else:
        sides = [Side("slm packed (sdpa)", ours, ours_loss, packed, device, dtype, attn="sdpa")]
        if device.type == "cuda":
            sides.append(Side("slm packed (triton)", ours, ours_loss, packed, device, dtype, attn="triton"))
    sides.append(Side("transformers padded (sdpa)", peer, peer_loss, padded, device, dtype))
    results = []
    if device.type == "cuda":
        # One model on the GPU at a time, so that each side's peak memory is its own.
        peer.cpu()
        for side in sides:
            free(device)
            side.start(args.warmup)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.passes):
                side.timed_pass()
            results.append(side.result(flop_per_token, peak, torch.cuda.max_memory_allocated(device) / 2**30))
            side.optimizer = None
            side.model.cpu()
    else:
        # A shared CPU's load drifts: the sides alternate pass by pass, so that both see the same.
        for side in sides:
            side.start(args.warmup)
        for _ in range(args.passes):
            for side in sides:
                side.timed_pass()
        results = [side.result(flop_per_token, peak) for side in sides]
    base = results[-1]["tok_s"]
    for r in results:
        r["speedup_vs_transformers"] = r["tok_s"] / base

    report = {"device": device_name, "commit": provenance.git_commit(), "command": " ".join(sys.argv),
              "model": "opt-350m (random weights)" if not args.small else f"small OPT {SMALL}",
              "dtype": args.dtype, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "examples": n_examples, "packed_micro_batches": len(packed), "padded_micro_batches": len(padded),
              "kernels": ours.kernels, "gflop_per_token": flop_per_token / 1e9,
              "peak_tflops": peak and peak / 1e12, "loss_check": sums, "results": results,
              "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{device_name} | commit {report['commit']} | {report['model']} | {args.dtype} | "
          f"T={args.seq_len} | {args.batch_size} rows/micro-batch")
    print(f"{'implementation':30s} {'tok/s':>10s} {'trained tok/s':>14s} {'ms/step':>9s} {'MFU':>7s} "
          f"{'peak GiB':>9s} {'vs peer':>8s}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['name']:30s} {r['tok_s']:10,.0f} {r['trained_tok_s']:14,.0f} {r['ms_per_step']:9.1f} "
              f"{mfu:>7s} {mem:>9s} {r['speedup_vs_transformers']:7.2f}x")


if __name__ == "__main__":
    main()
