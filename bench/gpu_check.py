"""The one prepared GPU check: tests, attention, a training step, decoding, memory and resume, in one run.

    PYTHONPATH=. python bench/gpu_check.py --out gpu_check            # one GPU, <= 8 minutes on an H100/H200
    PYTHONPATH=. python bench/gpu_check.py --out /tmp/gc --dry-run    # the same code on CPU, tiny shapes, ~1 min
    PYTHONPATH=. python bench/gpu_check.py --out gpu_check --only attention,decode

Writes DIR/results.json (every figure, the device, commit and versions, a traceback for any failure) and
DIR/summary.md (the tables it prints last); results.json is rewritten after every section, so a run
stopped early still leaves what it measured. Sections, each in its own Python process (a CUDA error or a
hang in one cannot take the others down, and each one's peak memory is its own), each with a timeout,
all within --budget seconds:

  gpu_tests   `pytest -m gpu` (the tests worth running on a device): pass/fail counts. Dry run: collection only.
  attention   bench/attention.py: the timed kernels checked first (bf16, D=64, causal, dense and packed, output
              and gradients vs the fp32 reference), then our Triton kernel vs SDPA's flash and cuDNN
              backends, fwd / bwd / fwd+bwd at OPT-350M shapes (H=16, D=64, causal, bf16, 16k tokens,
              T in 512, 1024, 2048), and packed rows of a realistic length mix vs dense at equal real tokens.
              FLOPs: 4*B*H*T^2*D halved when causal, bwd 2.5x, fwd+bwd 3.5x (attention.attention_flops).
  train_step  bench/train_step.py's sides: one random opt-350m, 8 x 2048 packed rows, fp16 and bf16 autocast,
              ours (sdpa; triton attention; every triton kernel) vs transformers' OPTForCausalLM + SDPA as
              TRL's SFTTrainer runs it (padded rows, full logits): tokens/s, MFU, peak memory, after a loss check.
              MFU = FLOP/token x tokens/s / peak, FLOP/token = 6*N_mm + 12*L*d*T (slm.flops.flops_per_token),
              peak from slm.flops.PEAK_FLOPS by device name (slm.flops.peak_flops).
  decode      bench/decode.py's pairs: greedy slm.generate vs transformers' generate() at batch 1 and 32
              (ms/token, share of equal tokens), eager and captured (slm.generate(..., compile=True)).
  memory      bench/memory.py --json's estimate next to torch.cuda.max_memory_allocated of the same step.
  resume      train.py, paper preset, random opt-350m on ToolBench-shaped synthetic shards: 60 steps,
              a second run SIGKILLed once its step-30 checkpoint exists and resumed: steps 31-60 must log
              the losses of the unkilled run (steps 1-30 of the two, before the kill, show determinism).

A `gpu_tests` run that selects no test is recorded as "unavailable: <reason>", never a crash; the exit status is 1 when a section failed or timed out. No file of ../shared is needed:
data, tokenizer and checkpoints are made on the spot.

--dry-run: each section on CPU at toy size (a 2-layer OPT of opt-350m's shape, T = 32..128, a 12-step
resume killed after step 6), kernels in Triton's interpreter: attention with 2 heads instead of 16, timed
by the host clock (CUDA events need a GPU); the training step in bf16 only, our sdpa side against
transformers' (interpreted Triton sides would take minutes). Its figures are not GPU figures.

On the workplace's device tool (one H200; torch 2.11, triton 3.6, transformers 5.17 are installed there):

    run(command="set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py --out $OUT/gpu_check 2>&1 | tee $OUT/gpu_check.log",
        timeout_s=540)

results.json, summary.md and the log come back under files_at. The machine stays warm 30 s after a call:
re-run a failed section at once with `--only SECTION` (same command), or call give_back.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402
from bench.harness import REPO  # noqa: E402
SECTIONS = ("gpu_tests", "attention", "train_step", "decode", "memory", "resume")
# Seconds per section on an H100/H200 (Triton and torch.compile compile inside them); they add up to
# the 8-minute budget, and a section never gets more than what the budget has left.
TIMEOUTS = {"gpu_tests": 60, "attention": 70, "train_step": 110, "decode": 80, "memory": 40, "resume": 110}
BUDGET = 470
# The dry run's CPU work is about a minute in all; the limits leave room for a machine shared with others.
DRY_TIMEOUTS = {name: 150 for name in SECTIONS}
DRY_BUDGET = 600
ALL_TRITON = {"attention": "triton", "layer_norm": "triton", "linear_cross_entropy": "triton"}
# The dry run's model: opt-350m's shape (post-LN, projected embedding) at toy size; head dim 64.
TINY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, ffn_dim=256,
            word_embed_proj_dim=64, do_layer_norm_before=False, max_position_embeddings=256)


# ===================================================================================================
# Shared pieces of the sections (run inside the worker processes)
# ===================================================================================================


class Context:
    """What a section needs to know: dry run or not, the device, a scratch directory; and where to leave
    the figures measured so far, which the orchestrator keeps if the section runs out of time."""

    def __init__(self, dry: bool, workdir: Path, partial_file: Path):
        import torch

        self.dry, self.workdir, self.partial_file = dry, workdir, partial_file
        self.device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
        self.cuda = self.device == "cuda"

    def save_partial(self, result: dict) -> None:
        self.partial_file.write_text(json.dumps(result, indent=1, default=str) + "\n")

    def opt_config(self, **overrides):
        import slm

        return slm.OPTConfig(**{**TINY, **overrides}) if self.dry else slm.OPTConfig.preset("opt-350m", **overrides)


def unavailable(reason: str) -> dict:
    return {"status": f"unavailable: {reason}"}


def import_bench(name: str):
    """bench/<name>.py as a module."""
    import importlib

    return importlib.import_module(f"bench.{name}")


def toolbench_shards(directory: Path, examples: int, max_len: int, vocab_size: int, fingerprint: str,
                     seed: int = 0):
    """Synthetic shards shaped like prepared ToolBench trajectories: realistic lengths (bench/attention.py's
    log-normal mix, median ~600 tokens), an untrained system + query prefix (~40%), then 2-5 assistant
    turns (trained) separated by tool observations (not trained). Returns the ShardDataset."""
    import numpy as np

    from slm.data import ShardDataset, ShardWriter

    attention = import_bench("attention")
    rng = np.random.default_rng(seed)
    lengths = attention.realistic_lengths(examples * max_len, max_len, seed)[:examples]
    writer = ShardWriter(directory, vocab_size=vocab_size, fingerprint=fingerprint, max_len=max_len)
    turns = trained = tokens = 0
    for i, length in enumerate(lengths):
        length = max(length, 24)
        k = int(rng.integers(2, 6))                     # assistant turns
        cuts = np.sort(rng.choice(np.arange(int(0.4 * length), length - 1), size=2 * k - 1, replace=False))
        mask = np.zeros(length, dtype=np.uint8)
        bounds = [*cuts, length]
        for turn in range(k):                           # turn spans: cut[2t] .. cut[2t+1] (the last: to the end)
            mask[bounds[2 * turn]:bounds[2 * turn + 1]] = 1
        ids = rng.integers(4, vocab_size, size=length)
        ids[0] = 2                                      # </s> first, as OPT's tokenizer does
        writer.add(ids.tolist(), mask.tolist(), query=f"synthetic query {seed}-{i}")
        turns, trained, tokens = turns + k, trained + int(mask.sum()), tokens + length
    writer.close({"rows_read": examples, "rows_used": turns, "chains": examples, "examples": examples,
                  "tokens": tokens, "trained_tokens": trained, "trained_turns": turns, "synthetic": True})
    return ShardDataset(directory)


def random_checkpoint(directory: Path, config, tokenizer=None) -> Path:
    import slm

    model = slm.OPT(config)
    model.init_weights(seed=0)
    return slm.save_model(model, directory, tokenizer=tokenizer)


def environment() -> dict:
    import torch
    import transformers
    import triton

    from slm import provenance

    device = provenance.device_name("cuda" if torch.cuda.is_available() else "cpu")
    return {"device": device, "commit": provenance.git_commit(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__}


# ===================================================================================================
# Sections: each returns a dict with "status" ("passed", "failed", "unavailable: ...") and its figures
# ===================================================================================================


def section_gpu_tests(ctx: Context) -> dict:
    """`pytest -m gpu`; a dry run (no GPU) only collects the subset, since it is meant for a device."""
    import re

    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    if ctx.dry:
        command.append("--collect-only")
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|"
                                                     r"xfailed|xpassed|tests? collected)", tail)}
    result = {"command": " ".join(command[1:]), "exit_code": proc.returncode, "summary": tail, "counts": counts}
    if proc.returncode == 5:
        return {**result, **unavailable("no test carries the `gpu` marker (pytest exit 5: nothing selected)")}
    if proc.returncode != 0:
        return {**result, "status": "failed", "output_tail": output[-4000:]}
    return {**result, "status": "passed"}


def host_do_bench(fn, grad_to_none=None, **_) -> float:
    """triton.testing.do_bench for the dry run: CUDA events do not exist on CPU; one call, host clock."""
    for x in grad_to_none or []:
        x.grad = None
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def check_timed_kernels(attention, device: str, dry: bool, heads: int) -> list[dict]:
    """Correctness of what is timed (bf16, D=64, causal, dense and packed) against the fp32 reference,
    forward and gradients, through bench/attention.py's `compare`. Its `check_correctness` covers every
    dtype and head dim, which the gpu tests also do: compiling all of them would eat this section's time."""
    import torch

    from slm.kernels import attention_reference, attention_varlen_reference, flash_attention, flash_attention_varlen

    seq_len, lengths = (37, [5, 1, 70, 33]) if dry else (300, [300, 1, 1000, 77, 513])
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    torch.manual_seed(0)

    def inputs(*shape):
        return [torch.randn(*shape, dtype=torch.bfloat16, device=device) for _ in range(3)]

    cases = {
        "dense": (lambda q, k, v: flash_attention(q, k, v, causal=True),
                  lambda q, k, v: attention_reference(q, k, v, causal=True),
                  inputs(2, heads, seq_len, attention.HEAD_DIM)),
        "varlen": (lambda q, k, v: flash_attention_varlen(q, k, v, cu_seqlens, max(lengths), causal=True),
                   lambda q, k, v: attention_varlen_reference(q, k, v, cu_seqlens, max(lengths), causal=True),
                   inputs(sum(lengths), heads, attention.HEAD_DIM)),
    }
    rows = []
    for layout, (kernel, reference, tensors) in cases.items():
        errors = attention.compare(kernel, reference, tensors)
        rows.append(dict(layout=layout, dtype="bfloat16", head_dim=attention.HEAD_DIM, causal=True,
                         ok=all(ok for _, ok in errors.values()), **{k: err for k, (err, _) in errors.items()}))
        print(f"check {layout} bf16 D={attention.HEAD_DIM} causal: max err "
              + " ".join(f"{k} {err:.2e}" for k, (err, _) in errors.items()) + (" ok" if rows[-1]["ok"] else " FAIL"))
    return rows


def section_attention(ctx: Context) -> dict:
    import torch

    attention = import_bench("attention")
    # The dry run times the same calls by the host clock, with 2 heads: the interpreter runs one program
    # per head at a time, and 16 would take minutes.
    timing = dict(heads=2, bench=host_do_bench) if ctx.dry else dict(heads=attention.HEADS)
    checks = check_timed_kernels(attention, ctx.device, ctx.dry, timing["heads"])
    result = {"checks": checks}
    if not all(row["ok"] for row in checks):
        return {**result, "status": "failed", "error": "correctness checks failed: no timings taken"}
    tokens, seq_lens = (128, (32, 64)) if ctx.dry else (attention.TOKENS_PER_BATCH, (512, 1024, 2048))
    rows = attention.bench_dense(torch.bfloat16, ctx.device, tokens, seq_lens, **timing)
    ctx.save_partial({**result, "rows": rows})
    rows += attention.bench_varlen(torch.bfloat16, ctx.device, tokens, row_len=seq_lens[-1], **timing)

    def row(case, impl):
        return next((r for r in rows if r["case"] == case and r["impl"] == impl and "error" not in r), None)

    targets = []
    for seq_len in seq_lens[1:]:
        ours, flash = row(f"dense B={tokens // seq_len} T={seq_len}", "triton"), \
            row(f"dense B={tokens // seq_len} T={seq_len}", "sdpa-flash")
        if ours and flash:
            targets.append(target(f"attention fwd+bwd vs sdpa-flash, T={seq_len}",
                                  flash["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 1.0, "x"))
    longest = row(f"dense B={tokens // seq_lens[-1]} T={seq_lens[-1]}", "triton")
    if longest:
        targets.append(target(f"attention fwd TFLOP/s, T={seq_lens[-1]}", longest["fwd_tflops"], 300, "TFLOP/s"))
    varlen = row(f"packed {tokens // seq_lens[-1]} x {seq_lens[-1]}", "triton varlen")
    if varlen and longest:
        targets.append(target("varlen fwd+bwd TFLOP/s / dense, equal tokens",
                              varlen["fwd_bwd_tflops"] / longest["fwd_bwd_tflops"], 0.9, "x"))
    return {**result, "status": "passed", "rows": rows, "targets": targets}


def target(name: str, value: float, goal: float, unit: str, higher_is_better: bool = True) -> dict:
    met = value >= goal if higher_is_better else value <= goal
    return {"name": name, "value": value, "goal": ("≥ " if higher_is_better else "≤ ") + f"{goal:g} {unit}",
            "met": met, "note": "dry run: not a GPU figure" if os.environ.get("TRITON_INTERPRET") == "1" else ""}


def section_train_step(ctx: Context) -> dict:
    import types

    import slm
    import torch
    import transformers

    from slm import flops

    train_step = import_bench("train_step")
    dry = ctx.dry
    args = types.SimpleNamespace(seq_len=128 if dry else 2048, batch_size=2 if dry else 8,
                                 examples=6 if dry else 64)
    passes, warmup = (1, 1) if dry else (2, 2)
    config = ctx.opt_config()
    dataset = toolbench_shards(ctx.workdir / "shards", args.examples, args.seq_len, config.vocab_size, "synthetic")
    packed, padded, _ = train_step.batches(dataset, args)
    checkpoint = random_checkpoint(ctx.workdir / "model", config)
    weights = slm.load_model(checkpoint).state_dict()
    device = torch.device(ctx.device)
    device_name = environment()["device"]
    peak = flops.peak_flops(device)   # None off CUDA

    variants = {"slm sdpa": dict(attn="sdpa"), "slm triton attention": dict(attn="triton"),
                "slm all triton kernels": dict(kernels=ALL_TRITON)}
    if dry:   # interpreted Triton kernels would take minutes here; the attention section runs them
        variants = {"slm sdpa": variants["slm sdpa"]}
    result = {"status": "passed", "device": device_name, "model": "opt-350m (random)" if not dry else "tiny OPT",
              "seq_len": args.seq_len, "batch_size": args.batch_size, "examples": len(dataset),
              "packed_micro_batches": len(packed), "padded_micro_batches": len(padded), "peak_tflops":
              peak and peak / 1e12, "by_dtype": {}}
    for dtype_name in ("bf16",) if dry else ("fp16", "bf16"):   # the same loop; one pass of it on CPU
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        peer = transformers.OPTForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                           torch_dtype=torch.float32)
        sides = []
        for name, kwargs in variants.items():
            model = slm.OPT(config, **kwargs)
            model.load_state_dict(weights)
            sides.append(train_step.Side(name, model, train_step.ours_loss, packed, device, dtype))
        sides.append(train_step.Side("transformers sdpa, padded", peer, train_step.peer_loss, padded, device, dtype))
        flop_per_token = flops.flops_per_token(sides[0].model, args.seq_len)

        # Correctness first: the loss per trained token of each side over the same examples, dropout off.
        losses = {}
        for side in sides:
            side.model.to(device).eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                sums = [side.loss_fn(side.model, b, device) for b in side.data]
            losses[side.name] = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)
            side.model.cpu()
        reference = losses["transformers sdpa, padded"]
        agree = all(abs(v - reference) <= 2e-2 * abs(reference) for v in losses.values())
        rows = []
        for side in sides:   # one model on the device at a time: each side's peak memory is its own
            train_step.free(device)
            side.start(warmup)
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(passes):
                side.timed_pass()
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if ctx.cuda else None
            rows.append(side.result(flop_per_token, peak, memory))
            side.optimizer = None
            side.model.cpu()
        for row in rows:
            row["vs_transformers"] = row["tok_s"] / rows[-1]["tok_s"]
        entry = {"loss_per_trained_token": losses, "losses_agree": agree, "rows": rows, "targets": []}
        best = max(rows[:-1], key=lambda r: r["tok_s"])
        entry["targets"].append(target(f"{dtype_name} step tokens/s vs transformers ({best['name']})",
                                       best["vs_transformers"], 1.5, "x"))
        if "mfu" in best:
            entry["targets"].append(target(f"{dtype_name} MFU ({best['name']})", 100 * best["mfu"], 40, "%"))
        if best["peak_mem_gib"] is not None:
            entry["targets"].append(target(f"{dtype_name} peak memory / transformers' ({best['name']})",
                                           best["peak_mem_gib"] / rows[-1]["peak_mem_gib"], 1.0, "x", False))
        result["by_dtype"][dtype_name] = entry
        if not agree:
            result["status"] = "failed"
            result["error"] = f"{dtype_name}: the sides' losses disagree (> 2% apart): {losses}"
        ctx.save_partial(result)
    return result


def section_decode(ctx: Context) -> dict:
    import statistics

    import slm
    import torch
    import transformers

    decode = import_bench("decode")
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    batches, prompt_len, new_tokens, repeats = ([1, 4], 16, 8, 1) if ctx.dry else ([1, 32], 512, 128, 3)
    config = ctx.opt_config()
    checkpoint = random_checkpoint(ctx.workdir / "model", config)
    ours = slm.load_model(checkpoint, dtype=dtype, device=ctx.device)
    hf = transformers.OPTForCausalLM.from_pretrained(checkpoint, torch_dtype=dtype, attn_implementation="sdpa")
    hf = hf.to(ctx.device).eval()
    result = {"status": "passed", "dtype": str(dtype).removeprefix("torch."), "prompt_len": prompt_len,
              "new_tokens": new_tokens, "rows": [], "targets": []}

    def eager():
        return slm.generate(ours, prompts, new_tokens, eos_id=None)

    for batch in batches:
        prompts = decode.make_prompts(batch, prompt_len, config.vocab_size, seed=batch)
        sides = {"eager": eager, "hf": lambda: decode.hf_generate(hf, prompts, new_tokens, ctx.device),
                 "captured": lambda: slm.generate(ours, prompts, new_tokens, eos_id=None, compile=True)}
        times, tokens_of, _ = decode.timed(sides, ctx.device, repeats)   # interleaved, after one warm-up each
        ours_s, hf_s, ours_tokens, hf_tokens = times["eager"], times["hf"], tokens_of["eager"], tokens_of["hf"]
        tokens = batch * new_tokens
        equal = sum(a == b for x, y in zip(ours_tokens, hf_tokens) for a, b in zip(x, y)) / tokens
        row = {"batch": batch, "hf_ms_per_token": 1e3 * statistics.median(hf_s) / new_tokens,
               "eager_ms_per_token": 1e3 * statistics.median(ours_s) / new_tokens,
               "eager_equal_to_hf": equal}
        row["captured_ms_per_token"] = 1e3 * statistics.median(times["captured"]) / new_tokens
        row["captured_equal_to_eager"] = tokens_of["captured"] == ours_tokens
        if not row["captured_equal_to_eager"]:
            result["status"] = "failed"
            result["error"] = f"batch {batch}: captured decoding's tokens differ from eager decoding's"
        row["best_ms_per_token"] = min(row["eager_ms_per_token"], row["captured_ms_per_token"])
        row["speedup_vs_hf"] = row["hf_ms_per_token"] / row["best_ms_per_token"]
        if dtype == torch.float32 and equal < 1:
            result["status"] = "failed"
            result["error"] = f"batch {batch}: float32 tokens differ from transformers' ({equal:.1%} equal)"
        result["rows"].append(row)
        ctx.save_partial(result)
    last, first = result["rows"][-1], result["rows"][0]
    result["targets"] = [
        target(f"decode tokens/s vs generate(), batch {last['batch']}", last["speedup_vs_hf"], 3, "x"),
        target(f"decode ms/token, batch {first['batch']}", first["best_ms_per_token"], 4, "ms", higher_is_better=False)]
    return result


def section_memory(ctx: Context) -> dict:
    """The paper recipe's step measured (our default model, 8 x 2048 packed rows, fp16 autocast, fp32 AdamW;
    two steps, so that AdamW's state exists) next to bench/memory.py's estimate of it."""
    import types

    import slm
    import torch

    train_step = import_bench("train_step")
    args = types.SimpleNamespace(seq_len=128 if ctx.dry else 2048, batch_size=2 if ctx.dry else 8, examples=64)
    config = ctx.opt_config()
    dataset = toolbench_shards(ctx.workdir / "shards", args.examples, args.seq_len, config.vocab_size, "synthetic")
    packed, _, _ = train_step.batches(dataset, args)
    model = slm.OPT(config)
    model.init_weights(seed=0)
    device = torch.device(ctx.device)
    # fp16 autocast is the paper's; CPU autocast runs bf16.
    side = train_step.Side("slm", model, train_step.ours_loss, packed[:1], device,
                           torch.float16 if ctx.cuda else torch.bfloat16)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    side.start(warmup=2)
    result = {"status": "passed"}
    if ctx.cuda:
        result["measured_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        result["measured"] = "not measured: no CUDA device (torch.cuda.max_memory_allocated)"

    script = REPO / "bench" / "memory.py"
    out = ctx.workdir / "memory.json"
    proc = subprocess.run([sys.executable, str(script), "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**result, "status": "failed", "error": f"bench/memory.py --json {out} exited {proc.returncode}",
                "output_tail": (proc.stdout + proc.stderr)[-4000:]}
    result["estimate"] = estimate = json.loads(out.read_text())
    total = next((estimate[k] for k in ("total_gib", "peak_gib", "total") if isinstance(estimate.get(k), (int, float))),
                 None)
    if total is not None:
        result["estimate_gib"] = total
        if "measured_gib" in result:
            result["measured_over_estimate"] = result["measured_gib"] / total
    return result


def section_resume(ctx: Context) -> dict:
    """train.py: an unkilled run beside one SIGKILLed after its checkpoint at the half-way step, then resumed."""
    import slm

    steps = 12 if ctx.dry else 60
    half = steps // 2
    max_len = 128 if ctx.dry else 2048
    texts = [f"Thought: call tool_{i} for the user\nAction: get_{i}_weather\nAction Input: {{}}" for i in range(50)]
    tok = slm.train_tokenizer(texts, 300, ctx.workdir / "tokenizer")
    vocab = -(-tok.vocab_size // 8) * 8
    config = ctx.opt_config(vocab_size=vocab) if ctx.dry else ctx.opt_config()
    checkpoint = random_checkpoint(ctx.workdir / "model", config, tokenizer=tok)
    data = ctx.workdir / "shards"
    toolbench_shards(data, 60 if ctx.dry else 400, max_len, tok.vocab_size, tok.fingerprint)
    base = [sys.executable, str(REPO / "train.py"), "--preset", "paper", "--model", str(checkpoint),
            "--data", str(data), "--max-len", str(max_len), "--max-steps", str(steps),
            "--save-every", str(half), "--log-every", "1", "--keep", "2"]
    if ctx.dry:
        base += ["--batch-size", "2", "--device", "cpu"]
    whole, killed = ctx.workdir / "whole", ctx.workdir / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {name: open(ctx.workdir / f"{name}.log", "w") for name in ("whole", "killed", "resumed")}
    # The uninterrupted reference runs beside the run that gets killed, and is stopped if we return early.
    reference = subprocess.Popen([*base, "--out", str(whole)], stdout=logs["whole"], stderr=subprocess.STDOUT,
                                 env=env)
    victim = subprocess.Popen([*base, "--out", str(killed)], stdout=logs["killed"], stderr=subprocess.STDOUT,
                              env=env)
    try:
        checkpoint_dir = killed / "checkpoints" / f"step_{half:08d}"
        while not checkpoint_dir.is_dir() and victim.poll() is None:
            time.sleep(0.02)
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        before_kill = metrics_losses(killed)
        result = {"steps": steps, "checkpoint_step": half, "killed_after_logged_step": max(before_kill, default=0)}
        if (killed / "final").exists() or not checkpoint_dir.is_dir():
            return {**result, "status": "failed", "error": "the run ended before the kill: nothing was tested",
                    "log_tail": (ctx.workdir / "killed.log").read_text()[-3000:]}
        resumed = subprocess.run([*base, "--out", str(killed), "--resume"], stdout=logs["resumed"],
                                 stderr=subprocess.STDOUT, env=env)
        reference.wait()
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()
    for name, code in (("whole", reference.returncode), ("resumed", resumed.returncode)):
        if code:
            return {**result, "status": "failed", "error": f"the {name} run exited {code}",
                    "log_tail": (ctx.workdir / f"{name}.log").read_text()[-3000:]}
    want, got = metrics_losses(whole), metrics_losses(killed)
    after = range(half + 1, steps + 1)
    first = range(1, half + 1)
    result.update(
        losses_whole=want, losses_resumed=got,
        equal_before_kill=all(before_kill.get(s) == want.get(s) for s in first),
        equal_after_resume=all(got.get(s) == want.get(s) for s in after),
        max_abs_diff_after_resume=max(abs(got.get(s, float("nan")) - want[s]) for s in after))
    result["status"] = "passed" if result["equal_after_resume"] else "failed"
    if not result["equal_after_resume"]:
        result["error"] = (f"steps {half + 1}-{steps} after the resume differ from the unkilled run's "
                           f"(max |diff| {result['max_abs_diff_after_resume']:.3g}; steps 1-{half} before the "
                           f"kill {'agreed' if result['equal_before_kill'] else 'differed too: not deterministic'})")
    return result


def metrics_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.endswith("}")]   # not a line being written
    return {r["step"]: r["loss"] for r in records if "loss" in r}


SECTION_RUNNERS = {"gpu_tests": section_gpu_tests, "attention": section_attention, "train_step": section_train_step,
                   "decode": section_decode, "memory": section_memory, "resume": section_resume}


def run_worker(section: str, dry: bool, result_path: Path) -> None:
    """Run one section in this process and write its result (or its traceback) to result_path."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{section}_") as workdir:
        start, result = time.perf_counter(), {}
        try:
            result["environment"] = environment()
            context = Context(dry, Path(workdir), partial_path(result_path))
            result.update(SECTION_RUNNERS[section](context))
        except Exception:
            result.update(status="failed", error=traceback.format_exc())
        result["seconds"] = time.perf_counter() - start
    result_path.write_text(json.dumps(result, indent=1, default=str) + "\n")


# ===================================================================================================
# The orchestrator: one process per section, a global budget, the JSON and the Markdown table
# ===================================================================================================


def partial_path(result_path: Path) -> Path:
    return result_path.with_name("partial_" + result_path.name)


def run_section(section: str, dry: bool, timeout: float) -> dict:
    """The section's result from its own process, with its output streamed line by line."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", section, "--result", str(result_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if dry:
            command.append("--dry-run")
            env["TRITON_INTERPRET"] = "1"   # before triton is imported: kernels run in its CPU interpreter
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        tail: list[str] = []

        def stream():
            for line in proc.stdout:
                print(f"  {section} | {line.rstrip()}", flush=True)
                tail[:] = (tail + [line.rstrip()])[-40:]

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
            why = f"its process exited {proc.returncode} before writing a result"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the section and whatever it started (train.py, pytest)
            proc.wait()
            why = f"timed out after {timeout:.0f} s"
        reader.join(timeout=5)
        if result_path.exists():
            return json.loads(result_path.read_text())
        partial = partial_path(result_path)
        kept = json.loads(partial.read_text()) if partial.exists() else {}
        if kept:
            why += "; the figures here are those measured before"
        return {**kept, "status": "failed", "error": f"{section}: {why}", "output_tail": "\n".join(tail),
                "seconds": time.perf_counter() - start}


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def summary_markdown(report: dict) -> str:
    meta, sections = report["meta"], report["sections"]
    lines = [f"# bench/gpu_check.py{' --dry-run' if meta['dry_run'] else ''}", "",
             f"{meta.get('device', '?')} | commit {meta.get('commit', '?')} | torch {meta.get('torch', '?')} | "
             f"triton {meta.get('triton', '?')} | transformers {meta.get('transformers', '?')} | "
             f"{meta['wall_s']:.0f} s of a {meta['budget_s']} s budget", "",
             "| section | status | seconds |", "|---|---|---|"]
    for name, s in sections.items():
        status = s["status"] + (f" — {s['error'].strip().splitlines()[-1][:120]}" if s.get("error") else "")
        lines.append(f"| {name} | {status} | {fmt(s.get('seconds'), '.0f')} |")
    targets = [t for s in sections.values() for t in s.get("targets", [])]
    targets += [t for s in sections.values() for d in s.get("by_dtype", {}).values() for t in d["targets"]]
    if targets:
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {fmt(t['value'])} | {t['goal']} | {'yes' if t['met'] else 'NO'}"
                  f"{' (' + t['note'] + ')' if t['note'] else ''} |" for t in targets]
    if sections.get("attention", {}).get("rows"):
        lines += ["", "| attention case | impl | fwd ms | bwd ms | f+b ms | fwd TF/s | bwd TF/s | f+b TF/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sections["attention"]["rows"]:
            figures = [fmt(r.get(k), ".3f") for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")]
            figures += [fmt(r.get(k), ".1f") for k in ("fwd_tflops", "bwd_tflops", "fwd_bwd_tflops")]
            lines.append(f"| {r['case']} | {r['impl']} | " + (" | ".join(figures) if "error" not in r
                                                              else f"unavailable: {r['error'][:80]} | | | | |") + " |")
    for dtype, entry in sections.get("train_step", {}).get("by_dtype", {}).items():
        lines += ["", f"| train step {dtype} | tok/s | ms/step | MFU % | peak GiB | vs transformers |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['tok_s']:,.0f} | {r['ms_per_step']:.1f} | "
                  f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} | {fmt(r['peak_mem_gib'])} | "
                  f"{r['vs_transformers']:.2f}x |" for r in entry["rows"]]
    if sections.get("decode", {}).get("rows"):
        lines += ["", "| decode batch | generate() ms/tok | eager ms/tok | captured ms/tok | speedup | equal tokens |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['hf_ms_per_token']:.2f} | {r['eager_ms_per_token']:.2f} | "
                  f"{fmt(r.get('captured_ms_per_token'))} | {r['speedup_vs_hf']:.2f}x | {r['eager_equal_to_hf']:.1%} |"
                  for r in sections["decode"]["rows"]]
    memory = sections.get("memory", {})
    if "estimate" in memory or "measured_gib" in memory:
        lines += ["", f"memory: estimate {fmt(memory.get('estimate_gib'))} GiB, measured "
                      f"{fmt(memory.get('measured_gib', memory.get('measured')))} GiB"]
    resume = sections.get("resume", {})
    if "equal_after_resume" in resume:
        lines += ["", f"resume: killed after step {resume['killed_after_logged_step']} (checkpoint "
                      f"{resume['checkpoint_step']}); steps after the resume equal: {resume['equal_after_resume']}; "
                      f"before the kill: {resume['equal_before_kill']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for results.json and summary.md")
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU with tiny shapes (~1 min)")
    parser.add_argument("--only", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole run (default {BUDGET}; dry run "
                                                      f"{DRY_BUDGET})")
    parser.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)   # one section, in its own process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.dry_run, args.result)
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    timeouts, budget = (DRY_TIMEOUTS, DRY_BUDGET) if args.dry_run else (TIMEOUTS, BUDGET)
    budget = args.budget or budget
    args.out.mkdir(parents=True, exist_ok=True)

    report = {"meta": {"command": " ".join(sys.argv), "dry_run": args.dry_run, "budget_s": budget,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_s": 0.0}, "sections": {}}
    start = time.perf_counter()
    for name in chosen:
        left = budget - (time.perf_counter() - start)
        if left < 10:
            report["sections"][name] = {"status": "skipped: the time budget is spent", "seconds": 0}
            continue
        timeout = min(timeouts[name], left)
        print(f"[gpu_check] {name}: start (timeout {timeout:.0f} s, {left:.0f} s of the budget left)", flush=True)
        result = run_section(name, args.dry_run, timeout)
        report["meta"].update({k: v for k, v in result.pop("environment", {}).items() if k not in report["meta"]})
        report["sections"][name] = result
        print(f"[gpu_check] {name}: {result['status']} in {result.get('seconds', 0):.1f} s", flush=True)
        report["meta"]["wall_s"] = time.perf_counter() - start
        (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    report["meta"]["wall_s"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    summary = summary_markdown(report)
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nwrote {args.out / 'results.json'} and {args.out / 'summary.md'}")
    # Exit 1 when a section failed or timed out; "unavailable" and "skipped" say what this checkout lacks.
    return 1 if any(s["status"] == "failed" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
