"""Greedy decoding speed of `slm.generate` against transformers' `generate()`, same checkpoint.

    python bench/decode.py                        # OPT-350M, random weights, on the GPU
    python bench/decode.py --stabletoolbench      # + wall time of one full stabletoolbench run
    python bench/decode.py --small                # a small config on the CPU: the ratio only
    python bench/decode.py --compile              # + slm.generate(compile=True): the decode step captured

Both libraries load one random checkpoint written in Hugging Face's layout, decode the same prompts
(lengths spread from --prompt-len/2 to --prompt-len, left-padded in a batch) greedily for exactly
--new-tokens tokens (no early stop: our eos_id=None, transformers' min_new_tokens = max_new_tokens),
and must produce the same tokens before any time is reported (in half precision a few argmax ties may
flip: the share of equal tokens is printed). Timed: whole calls, prefill included, median of
--repeats calls after a warm-up, ours and theirs interleaved, with a device sync at both ends.
With --compile, `slm.generate(compile=True)` is a third column: its warm-up call compiles the decode
step (CUDA graphs on CUDA, C++ kernels on the CPU), and those seconds are printed apart ("compile s");
its tokens must equal eager slm's in float32.

tokens/s = batch * new_tokens / seconds;  ms/token (batch 1) = seconds / new_tokens * 1000.
Targets (H100): >= 3x generate() tokens/s at batch 32, <= 4 ms/token at batch 1.

The stabletoolbench run evaluates the random model on every query file of ../shared with the real
tokenizer; random weights never write </s>, so every episode ends after one step of --new-tokens
tokens ("runaway"): the figure is one full decoding round over all queries, not a trained model's run.
Prints a table last; --json FILE keeps every figure with the device, commit and versions. From Python:
`run(config, device, dtype, ...)` returns that JSON's dict (bench/gpu_check.py calls it).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402
from bench.harness import REPO  # noqa: E402
from slm import kernels  # noqa: E402
import slm  # noqa: E402
from slm import provenance  # noqa: E402
from slm.generate import generate  # noqa: E402

SHARED = REPO.parent / "shared"
QUERY_FILES = SHARED / "toolbench/queries/stabletoolbench_solvable/test_instruction"


def small_config() -> slm.OPTConfig:
    """A CPU-sized OPT: 4 post-LN layers of width 256 with opt-350m's projected embedding and vocabulary."""
    return slm.OPTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                         word_embed_proj_dim=128, do_layer_norm_before=False)


def timed(fns: dict, device: str, repeats: int) -> tuple[dict, dict, dict]:
    """Seconds of `repeats` calls of each function, interleaved (a, b, a, b, ...) after one warm-up each.

    Interleaving makes every side see the same background load, which matters on shared CPU machines.
    Returns the timed seconds, the last results and the warm-up seconds (a compiled step's compile).
    """
    results, warmup = {}, {}
    for name, fn in fns.items():
        harness.sync(device)
        start = time.perf_counter()
        results[name] = fn()
        harness.sync(device)
        warmup[name] = time.perf_counter() - start
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            harness.sync(device)
            start = time.perf_counter()
            results[name] = fn()
            harness.sync(device)
            times[name].append(time.perf_counter() - start)
    return times, results, warmup


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(prompt_len // 2, prompt_len, batch).long().tolist() if batch > 1 else [prompt_len]
    # Ids from 4 up: no pad (1) and no </s> (2) inside a prompt, BOS first as the tokenizer does.
    return [[2] + torch.randint(4, vocab, (n - 1,), generator=generator).tolist() for n in lengths]


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, device: str) -> list[list[int]]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[1] * (longest - len(p)) + p for p in prompts], device=device)
    mask = (ids != 1).long()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, num_beams=1, pad_token_id=1, eos_token_id=None)
    return out[:, longest:].tolist()


def stabletoolbench_wall_time(checkpoint: Path, device: str, dtype: str, kernels: dict, new_tokens: int) -> dict:
    import evaluate

    files = sorted(QUERY_FILES.glob("*.json"))
    if not files:
        return {"skipped": f"no query files under {QUERY_FILES}"}
    out = Path(tempfile.mkdtemp(prefix="bench-stb-"))
    start = time.perf_counter()
    results = evaluate.main([
        "--model", str(checkpoint), "--tokenizer", str(SHARED / "opt"), "--suite", "stabletoolbench",
        "--data", *map(str, files), "--tools", str(SHARED / "toolbench/tools/toolenv2404"),
        "--out", str(out), "--device", device, "--dtype", dtype,
        "--kernels", ",".join(f"{op}={name}" for op, name in kernels.items()),
        "--batch-size", "32", "--max-new-tokens", str(new_tokens)])
    return {"wall_s": time.perf_counter() - start, "queries": results["overall"]["queries"],
            "generate_s": results["timings"]["generate_s"], "new_tokens": results["timings"]["new_tokens"],
            "outcomes": results["overall"]["outcomes"], "out": str(out)}


def batch_row(batch: int, new_tokens: int, times: dict, tokens_of: dict, warmup: dict) -> dict:
    """One batch's figures from `timed`: per side the median seconds, tok/s and ms/token; the share of
    ours' tokens equal to hf's; speedups over hf; with a compiled side its compile seconds and whether
    its tokens are ours'."""
    seconds = {name: statistics.median(t) for name, t in times.items()}
    tokens = batch * new_tokens
    equal = sum(a == b for x, y in zip(tokens_of["ours"], tokens_of["hf"]) for a, b in zip(x, y))
    row = {"batch": batch, "equal_token_share": equal / tokens}
    for name, s in seconds.items():
        row.update({f"{name}_s": s, f"{name}_tok_s": tokens / s, f"{name}_ms_per_token": s / new_tokens * 1000,
                    f"{name}_times_s": times[name]})
    row["speedup"] = seconds["hf"] / seconds["ours"]
    if "compiled" in seconds:
        row.update(compiled_speedup=seconds["hf"] / seconds["compiled"], compile_s=warmup["compiled"],
                   compiled_equal_to_ours=tokens_of["compiled"] == tokens_of["ours"])
    return row


def run(config, device: str = "cuda", dtype: str = "bfloat16", kernels: dict | None = None, batches=(1, 32),
        prompt_len: int = 1024, new_tokens: int = 128, repeats: int = 3, compile: bool = False,
        stabletoolbench: bool = False, partial=None) -> dict:
    """Greedy decoding of one random checkpoint of `config` by slm ("ours", and "compiled" with compile=True)
    and by transformers' generate() ("hf"), per batch size: {"runs": [one row a batch], "errors": [...]},
    with the device, commit and versions. An error is a float32 run whose tokens differ (ours vs hf,
    compiled vs ours). partial(result so far) is called after each batch."""
    import transformers

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        checkpoint = harness.random_checkpoint(config, Path(tmp))
        ours = slm.load_model(checkpoint, dtype=torch_dtype, device=device, kernels=kernels)
        hf = transformers.OPTForCausalLM.from_pretrained(checkpoint, torch_dtype=torch_dtype,
                                                         attn_implementation="sdpa")
        hf = hf.to(device).eval()
        result = {"device": provenance.device_name(device), "commit": provenance.git_commit(),
                  "torch": torch.__version__, "transformers": transformers.__version__, "dtype": dtype,
                  "kernels": ours.kernels, "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": [],
                  "errors": []}
        for batch in batches:
            prompts = make_prompts(batch, prompt_len, config.vocab_size, seed=batch)
            fns = {"ours": lambda: generate(ours, prompts, new_tokens, eos_id=None),
                   "hf": lambda: hf_generate(hf, prompts, new_tokens, device)}
            if compile:
                fns["compiled"] = lambda: generate(ours, prompts, new_tokens, eos_id=None, compile=True)
            times, tokens_of, warmup = timed(fns, device, repeats)
            result["runs"].append(batch_row(batch, new_tokens, times, tokens_of, warmup))
            if dtype == "float32" and tokens_of["ours"] != tokens_of["hf"]:
                result["errors"].append(f"batch {batch}: tokens differ from transformers' in float32")
            if compile and dtype == "float32" and not result["runs"][-1]["compiled_equal_to_ours"]:
                result["errors"].append(f"batch {batch}: compile=True's tokens differ from eager's in float32")
            if partial:
                partial(result)
        if stabletoolbench:   # every op resolved, passed on to evaluate.py
            result["stabletoolbench"] = stabletoolbench_wall_time(checkpoint, device, dtype, ours.kernels, new_tokens)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small config on the CPU (the ratio is the figure)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on cuda, float32 on cpu")
    kernels.add_arguments(parser, "attention sdpa, layer_norm torch (ours)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--prompt-len", type=int, default=None, help="longest prompt (default 1024; 128 with --small)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per prompt (default 128; 32 with --small)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--compile", action="store_true", help="also time slm.generate(compile=True)")
    parser.add_argument("--stabletoolbench", action="store_true", help="also time one full stabletoolbench run")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.small else "cuda")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.prompt_len = args.prompt_len or (128 if args.small else 1024)
    args.new_tokens = args.new_tokens or (32 if args.small else 128)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/decode.py: no CUDA device here; run with --small for the CPU comparison")

    config = small_config() if args.small else slm.OPTConfig.preset("opt-350m")
    report = run(config, args.device, args.dtype, args.kernels, args.batches, args.prompt_len, args.new_tokens,
                 args.repeats, args.compile, args.stabletoolbench)
    report["config"] = "small" if args.small else "opt-350m"
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report["errors"]:
        sys.exit("bench/decode.py: " + "; ".join(report["errors"]))
    print(f"\ndecode, {report['config']} {args.dtype} on {report['device']}, commit {report['commit']}, prompts <= "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, kernels "
          + ",".join(f"{op}={name}" for op, name in report["kernels"].items()))
    captured = f"  {'compiled tok/s':>14}  {'speedup':>7}  {'ms/tok':>7}  {'compile s':>9}" if args.compile else ""
    print(f"{'batch':>5}  {'slm tok/s':>10}  {'hf tok/s':>10}  {'speedup':>7}  {'slm ms/tok':>10}  "
          f"{'hf ms/tok':>9}  {'same tokens':>11}{captured}")
    for r in report["runs"]:
        captured = (f"  {r['compiled_tok_s']:>14.1f}  {r['compiled_speedup']:>6.2f}x  "
                    f"{r['compiled_ms_per_token']:>7.2f}  {r['compile_s']:>9.1f}" if args.compile else "")
        print(f"{r['batch']:>5}  {r['ours_tok_s']:>10.1f}  {r['hf_tok_s']:>10.1f}  {r['speedup']:>6.2f}x  "
              f"{r['ours_ms_per_token']:>10.2f}  {r['hf_ms_per_token']:>9.2f}  {r['equal_token_share']:>10.1%}"
              + captured)
    if "stabletoolbench" in report:
        print(f"stabletoolbench: {json.dumps(report['stabletoolbench'])}")


if __name__ == "__main__":
    main()
