"""The one prepared GPU check: tests, attention, a training step, decoding, memory and resume, in one run.

    PYTHONPATH=. python bench/gpu_check.py --out gpu_check            # one GPU, <= 8 minutes on an H100/H200
    PYTHONPATH=. python bench/gpu_check.py --out /tmp/gc --dry-run    # the same code on CPU, tiny shapes, ~1 min
    PYTHONPATH=. python bench/gpu_check.py --out gpu_check --only attention,decode

Writes DIR/results.json (every figure, the device, commit and versions, a traceback for any failure) and
DIR/summary.md (the tables it prints last); results.json is rewritten after every section, so a run
stopped early still leaves what it measured. Sections, each in its own Python process (a CUDA error or a
hang in one cannot take the others down, and each one's peak memory is its own), each with a timeout,
all within --budget seconds:

Each section but gpu_tests and resume calls a bench script's `run` at this check's sizes; what gpu_check
adds is the targets and the tables.

  gpu_tests   `pytest -m gpu` (the tests worth running on a device): pass/fail counts. Dry run: collection only.
  attention   bench/attention.py: the timed kernels checked first (bf16, D=64, causal, dense and packed, output
              and gradients vs the fp32 reference), then our Triton kernel vs SDPA's flash and cuDNN
              backends, fwd / bwd / fwd+bwd at OPT-350M shapes (H=16, D=64, causal, bf16, 16k tokens,
              T in 512, 1024, 2048), and packed rows of a realistic length mix vs dense at equal real tokens.
              FLOPs: 4*B*H*T^2*D halved when causal, bwd 2.5x, fwd+bwd 3.5x (attention.attention_flops).
  train_step  bench/train_step.py: one random opt-350m, 8 x 2048 packed rows, fp16 and bf16 autocast,
              ours (sdpa; triton attention; every triton kernel) vs transformers' OPTForCausalLM + SDPA as
              TRL's SFTTrainer runs it (padded rows, full logits): tokens/s, MFU, peak memory, after a loss check.
              MFU = FLOP/token x tokens/s / peak, FLOP/token = 6*N_mm + 12*L*d*T (slm.flops.flops_per_token),
              peak from slm.flops.PEAK_FLOPS by device name (slm.flops.peak_flops).
  decode      bench/decode.py: greedy slm.generate vs transformers' generate() at batch 1 and 32
              (ms/token, share of equal tokens), eager and captured (slm.generate(..., compile=True)), whose
              tokens must be eager's.
  memory      bench/memory.py's estimate next to torch.cuda.max_memory_allocated of the same step.
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


def section_attention(ctx: Context) -> dict:
    """bench/attention.py's run: the timed kernels checked first (bf16, D=64, causal; its full check covers
    every dtype and head dim, which the gpu tests also do: compiling all of them would eat this section's
    time), then timed."""
    import torch

    attention = import_bench("attention")
    # The dry run times the same calls by the host clock, with 2 heads: the interpreter runs one program
    # per head at a time, and 16 would take minutes.
    timing = dict(heads=2, bench=host_do_bench) if ctx.dry else {}
    tokens, seq_lens = (128, (32, 64)) if ctx.dry else (attention.TOKENS_PER_BATCH, attention.SEQ_LENS)
    result = attention.run(ctx.device, tokens=tokens, seq_lens=seq_lens, partial=ctx.save_partial,
                           check=dict(dtypes=(torch.bfloat16,), head_dims=[attention.HEAD_DIM], causals=(True,)),
                           **timing)
    if not all(row["ok"] for row in result["checks"]):
        return {**result, "status": "failed", "error": "correctness checks failed: no timings taken"}
    rows = result["rows"]

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
    return {**result, "status": "passed", "targets": targets}


def target(name: str, value: float, goal: float, unit: str, higher_is_better: bool = True) -> dict:
    met = value >= goal if higher_is_better else value <= goal
    return {"name": name, "value": value, "goal": ("≥ " if higher_is_better else "≤ ") + f"{goal:g} {unit}",
            "met": met, "note": "dry run: not a GPU figure" if os.environ.get("TRITON_INTERPRET") == "1" else ""}


def section_train_step(ctx: Context) -> dict:
    """bench/train_step.py's run in fp16 and in bf16 (the dry run: bf16 only, our sdpa side alone, since
    interpreted Triton sides would take minutes; the attention section runs them)."""
    train_step = import_bench("train_step")
    seq_len, batch_size, examples = (128, 2, 6) if ctx.dry else (2048, 8, 64)
    config = ctx.opt_config()
    dataset = toolbench_shards(ctx.workdir / "shards", examples, seq_len, config.vocab_size, "synthetic")
    variants = {"slm sdpa": {"attention": "sdpa"}, "slm triton attention": {"attention": "triton"},
                "slm all triton kernels": ALL_TRITON}
    if ctx.dry:
        variants = {"slm sdpa": variants["slm sdpa"]}
    result = {"status": "passed", "model": "tiny OPT" if ctx.dry else "opt-350m (random)", "by_dtype": {}}
    for dtype in ("bf16",) if ctx.dry else ("fp16", "bf16"):
        entry = train_step.run(config, dataset, variants, dtype, seq_len, batch_size, examples,
                               passes=1 if ctx.dry else 2, warmup=1 if ctx.dry else 2, device=ctx.device)
        entry["targets"] = []
        result["by_dtype"][dtype] = entry
        if not entry["losses_agree"]:
            result.update(status="failed", error=f"{dtype}: the sides' losses disagree (> {entry['loss_tolerance']:.0%} "
                                                 f"apart): {entry['loss_per_trained_token']}; no timings taken")
            ctx.save_partial(result)
            continue
        rows = entry["rows"]
        best = max(rows[:-1], key=lambda r: r["tok_s"])
        entry["targets"].append(target(f"{dtype} step tokens/s vs transformers ({best['name']})",
                                       best["vs_transformers"], 1.5, "x"))
        if "mfu" in best:
            entry["targets"].append(target(f"{dtype} MFU ({best['name']})", 100 * best["mfu"], 40, "%"))
        if best["peak_mem_gib"] is not None:
            entry["targets"].append(target(f"{dtype} peak memory / transformers' ({best['name']})",
                                           best["peak_mem_gib"] / rows[-1]["peak_mem_gib"], 1.0, "x", False))
        ctx.save_partial(result)
    return result


def section_decode(ctx: Context) -> dict:
    """bench/decode.py's run: greedy slm.generate, eager and captured, against transformers' generate()."""
    decode = import_bench("decode")
    sizes = dict(dtype="float32", batches=[1, 4], prompt_len=16, new_tokens=8, repeats=1) if ctx.dry else \
        dict(dtype="bfloat16", batches=[1, 32], prompt_len=512, new_tokens=128, repeats=3)
    result = decode.run(ctx.opt_config(), ctx.device, compile=True, partial=ctx.save_partial, **sizes)
    # Captured decoding must give eager's tokens in every dtype here (bench/decode.py asks it in float32 only).
    errors = result["errors"] + [f"batch {r['batch']}: captured decoding's tokens differ from eager decoding's"
                                 for r in result["runs"] if not r["compiled_equal_to_ours"]]
    for r in result["runs"]:
        r["best_ms_per_token"] = min(r["ours_ms_per_token"], r["compiled_ms_per_token"])
        r["speedup_vs_hf"] = r["hf_ms_per_token"] / r["best_ms_per_token"]
    last, first = result["runs"][-1], result["runs"][0]
    result["targets"] = [
        target(f"decode tokens/s vs generate(), batch {last['batch']}", last["speedup_vs_hf"], 3, "x"),
        target(f"decode ms/token, batch {first['batch']}", first["best_ms_per_token"], 4, "ms", higher_is_better=False)]
    return {**result, "status": "failed", "error": "; ".join(errors)} if errors else {**result, "status": "passed"}


def section_memory(ctx: Context) -> dict:
    """The paper recipe's step measured (our default model, 8 x 2048 packed rows, fp16 autocast, fp32 AdamW;
    two steps, so that AdamW's state exists) next to bench/memory.py's estimate of it."""
    import slm
    import torch

    train_step, memory = import_bench("train_step"), import_bench("memory")
    seq_len, batch_size = (128, 2) if ctx.dry else (2048, 8)
    config = ctx.opt_config()
    dataset = toolbench_shards(ctx.workdir / "shards", 64, seq_len, config.vocab_size, "synthetic")
    packed, _, _ = train_step.batches(dataset, seq_len, batch_size, 64)
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
    del side, model
    result["estimate"] = estimate = memory.run(memory.parse_args([]))   # its defaults: the paper recipe
    result["estimate_gib"] = estimate["peak_gib"]
    if "measured_gib" in result:
        result["measured_over_estimate"] = result["measured_gib"] / estimate["peak_gib"]
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
    checkpoint = harness.random_checkpoint(config, ctx.workdir / "model", tokenizer=tok)
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
    if sections.get("decode", {}).get("runs"):
        lines += ["", "| decode batch | generate() ms/tok | eager ms/tok | captured ms/tok | speedup | equal tokens |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['hf_ms_per_token']:.2f} | {r['ours_ms_per_token']:.2f} | "
                  f"{fmt(r.get('compiled_ms_per_token'))} | {fmt(r.get('speedup_vs_hf'))}x | "
                  f"{r['equal_token_share']:.1%} |" for r in sections["decode"]["runs"]]
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
