"""The benchmarks run end to end on a CPU at tiny sizes, in seconds.

    pytest tests/test_bench_scripts.py

Benchmarks are scripts pytest never collects; these tests load them by path and call their main() or their
run(), on tiny configs.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # bench/ as a package, for bench.gpu_check


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("op,impl,sizes", [
    ("layer_norm", "torch", ["--tokens", "37", "--width", "80"]),
    ("linear_cross_entropy", "torch", ["--tokens", "5", "--width", "64", "--vocab", "1000"]),
    ("attention", "sdpa", ["--batch", "1", "--heads", "2", "--seq-len", "33", "--head-dim", "64"]),
])
def test_kernel_benchmark_runs_on_cpu(tmp_path, op, impl, sizes):
    out = tmp_path / "rows.json"
    result = load_script("op").main(["--op", op, "--impl", impl, "--device", "cpu", "--dtype", "fp32",
                                     "--reps", "1", "--json", str(out), *sizes])
    rows = result["rows"]
    names = [row["impl"] for row in rows]
    assert names[0] == impl and names[-1].startswith("peer: ") and len(names) == (2 if impl == "torch" else 3)
    for row in rows:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd"] > 0 and row["device"] and row["commit"]
        assert row["peak_mib"] is None   # not measured on CPU
    assert json.loads(out.read_text()) == result


def test_kernel_benchmark_saved_memory_shows_the_logits(tmp_path):
    """Materialised logits are what the cross-entropy saves: (N, V) fp32 at least."""
    rows = load_script("op").main(["--op", "linear_cross_entropy", "--impl", "torch", "--device", "cpu",
                                   "--dtype", "fp32", "--reps", "1", "--skip-check", "--tokens", "16",
                                   "--width", "64", "--vocab", "4096"])["rows"]
    assert rows[0]["saved_mib"] >= 16 * 4096 * 4 / 2**20


def test_kernel_benchmark_refuses_an_unknown_implementation():
    with pytest.raises(ValueError, match="nope"):
        load_script("op").main(["--op", "layer_norm", "--impl", "nope", "--device", "cpu"])


def test_memory_budget_on_a_tiny_config(tmp_path):
    """opt-125m's width, 64 tokens per row, fp32 on CPU: the JSON has the parts and peak_gib, and
    checkpointing keeps only each layer's input: over 5x fewer saved activations."""
    memory = load_script("memory")
    common = ["--model", "opt-125m", "--batch-size", "2", "--seq-len", "64", "--measure-len", "32",
              "--dtype", "fp32", "--device", "cpu"]
    plain = memory.main([*common, "--json", str(tmp_path / "plain.json")])
    saved = json.loads((tmp_path / "plain.json").read_text())
    assert saved["peak_gib"] == pytest.approx(sum(saved["parts_gib"].values()))
    params = saved["parameters"]
    assert 120e6 < params < 130e6 and saved["parts_gib"]["optimizer"] == pytest.approx(8 * params / 2**30)
    layer_input = 64 * 768 * 4 / 2**20                 # one row's input to a layer, fp32, MiB
    assert plain["activations_per_layer_per_row_mib"] > 5 * layer_input
    checkpointed = memory.main([*common, "--activation-checkpointing"])
    assert checkpointed["activations_per_layer_per_row_mib"] == pytest.approx(layer_input)
    assert checkpointed["parts_gib"]["activations"] * 5 < plain["parts_gib"]["activations"]
    lm = memory.main([*common, "--lm"])
    assert lm["parts_gib"]["loss"] == pytest.approx(2 * 64 * 50272 * 4 / 2**30, rel=0.05)   # fp32 log-probs


def tiny_config():
    """bench/gpu_check.py's dry-run model: opt-350m's shape (post-LN, projected embedding) at toy size."""
    import slm
    from bench import gpu_check

    return slm.OPTConfig(**gpu_check.TINY)


def test_train_step_checks_the_loss_then_times_each_side(tmp_path):
    """A tiny OPT against transformers' on CPU in fp32: the losses per trained token agree, then each side
    gets a timed row, the peer's last."""
    from bench import gpu_check

    train_step = load_script("train_step")
    config = tiny_config()
    dataset = gpu_check.toolbench_shards(tmp_path, 4, 64, config.vocab_size, "synthetic")
    result = train_step.run(config, dataset, {"slm sdpa": {"attention": "sdpa"}}, "fp32", seq_len=64, batch_size=2,
                            examples=4, passes=1, warmup=1, device="cpu")
    assert result["losses_agree"] and list(result["loss_per_trained_token"]) == ["slm sdpa", train_step.PEER]
    ours, peer = result["rows"]
    assert ours["name"] == "slm sdpa" and peer["name"] == train_step.PEER and peer["vs_transformers"] == 1
    assert ours["steps"] == result["packed_micro_batches"] and peer["steps"] == result["padded_micro_batches"]
    assert ours["tok_s"] > 0 and ours["vs_transformers"] > 0 and result["commit"] and result["device"]


def test_decode_gives_transformers_tokens_before_timing_them():
    decode = load_script("decode")
    result = decode.run(tiny_config(), "cpu", "float32", batches=(1, 3), prompt_len=8, new_tokens=4, repeats=1)
    assert result["errors"] == [] and [r["batch"] for r in result["runs"]] == [1, 3]
    for r in result["runs"]:
        assert r["equal_token_share"] == 1 and r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 and len(r["ours_times_s"]) == 1
