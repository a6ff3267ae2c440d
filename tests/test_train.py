"""train.py on CPU with a tiny random OPT on the real ToolBench sample rows (prepared with OPT's tokenizer).

    pytest tests/test_train.py

Short runs of the real script (in-process through `train.main`, or as subprocesses where a process
must be killed or several must run): token-normalised gradient accumulation, exact resume after
SIGKILL, two-process DDP, the export, the LR schedule, the masked loss, and every up-front error.
About a minute on two idle cores; most of it is the three processes of the SIGKILL test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slm
from slm import flops, kernels
from slm.checkpoint import checkpoint_dirs
from slm.optimizers import make_optimizers
from conftest import REPO, shared_path

sys.path.insert(0, str(REPO))
import train  # noqa: E402
from data.prepare import prepare  # noqa: E402
from slm.data import IGNORE_INDEX, PackedLoader, ShardDataset  # noqa: E402

SAMPLE = ("toolbench", "sft", "toolllama_dfs_data_example.json")
# One layer, one head: on a CPU the 2048x2048 attention of the real rows dominates the cost.
TINY = dict(vocab_size=50272, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, ffn_dim=32)
# Flags shared by every run: fp32 on CPU, no eval split unless a test asks for one.
BASE = ["--device", "cpu", "--eval-fraction", "0", "--lr", "3e-3", "--warmup", "2", "--log-every", "1"]
# Two steps of 8 rows with an eval loss at the end (4 of the sample's 8 queries are held out).
RUN_8_ROWS = ["--max-steps", "2", "--eval-fraction", "0.3", "--eval-every", "2"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, opt_tokenizer):
    out = tmp_path_factory.mktemp("sft") / "shards"
    prepare([shared_path(*SAMPLE)], opt_tokenizer, out, max_len=2048, show_progress=False)
    return out


def tiny_model(directory: Path, dropout: float, tokenizer, **overrides) -> Path:
    model = slm.OPT(slm.OPTConfig(**{**TINY, **overrides}, dropout=dropout))
    model.init_weights(seed=0)
    return slm.save_model(model, directory, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory, opt_tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {"plain": tiny_model(root / "plain", 0.0, opt_tokenizer),
            "dropout": tiny_model(root / "dropout", 0.1, opt_tokenizer)}


def run_train(args: list[str]) -> None:
    train.main([*BASE, *args])


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.endswith("}")]  # skip a line being written
    return {r["step"]: r[key] for r in lines if key in r}


def subprocess_args(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *BASE, *args]


# ------------------------------------------------------------------------------------- pure pieces


def test_lr_schedule_is_linear_warmup_then_linear_decay():
    cfg = train.TrainConfig(lr=1e-3, warmup=4)
    values = [train.lr_at(s, cfg, total_steps=10) for s in range(11)]
    expected = [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6,
                1e-3 / 6, 0]
    assert values == pytest.approx(expected, abs=1e-12)


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest():
    model = slm.OPT(slm.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  ffn_dim=32))
    names = {id(p): name for name, p in model.named_parameters()}
    for choice, expected in (("adamw", [28]), ("muon", [20, 8])):   # 8 = 2 layers x (qkv, o, fc1, fc2)
        cfg = train.TrainConfig(optimizer=choice, lr=1e-3, muon_lr=0.02)
        optimizers = make_optimizers(model, cfg)
        held = [[names[id(p)] for group in o.param_groups for p in group["params"]] for o in optimizers]
        assert [len(h) for h in held] == expected and sorted(sum(held, [])) == sorted(names.values())
        if choice == "muon":
            assert all(n.startswith("layers.") and n.endswith("weight") and "norm" not in n for n in held[1])
            assert [g["peak_lr"] for o in optimizers for g in o.param_groups] == [1e-3, 1e-3, 0.02, 0.02]
            assert [g["blocks"] for g in optimizers[1].param_groups] == [1, 3]   # fused q/k/v: 3 matrices


@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_untrained_targets_change_neither_loss_nor_gradients(implementation):
    linear_cross_entropy = kernels.get("linear_cross_entropy", implementation)
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 6))
    targets[0, :3] = targets[1, 4:] = IGNORE_INDEX
    trained = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    labels = targets.flatten()[trained]

    def loss_and_grads(h):
        loss = train.trained_token_loss(h, trained, labels, head, linear_cross_entropy)
        return loss, torch.autograd.grad(loss, (hidden, head))

    loss, grads = loss_and_grads(hidden)
    reference = F.cross_entropy((hidden @ head.T).flatten(0, 1), targets.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(reference, (hidden, head))
    torch.testing.assert_close(loss, reference)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # Whatever sits at untrained positions (even NaN) touches neither the loss nor any gradient.
    garbage = torch.where((targets == IGNORE_INDEX)[..., None], torch.full_like(hidden, float("nan")), hidden)
    loss2, grads2 = loss_and_grads(garbage)
    torch.testing.assert_close(loss2, loss)
    for g, r in zip(grads2, grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA A10G", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", None)])
def test_peak_flops_by_device_name_most_specific_first(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda")) == peak
    assert flops.peak_flops(torch.device("cpu")) is None


def test_steps_stop_at_epoch_ends_and_positions_resume_the_stream(sft_data):
    """18 examples in rows of 4 make 5 micro-batches an epoch: steps of 2, 2 and then the 1 left."""
    def loader():
        return PackedLoader(ShardDataset(sft_data), rows=4, seed=0, epochs=None)

    steps = train.optimizer_steps(loader(), accum=2)
    taken = [next(steps) for _ in range(6)]
    assert [len(micro) for micro, _ in taken] == [2, 2, 1, 2, 2, 1]
    for k, (_, position) in enumerate(taken[:-1]):   # a run resumed after step k sees steps k+1...
        resumed = loader()
        resumed.load_state_dict(position)
        micro, _ = next(train.optimizer_steps(resumed, accum=2))
        expected = taken[k + 1][0]
        assert len(micro) == len(expected)
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(micro, expected))


@pytest.mark.parametrize("lm", [False, True])
def test_step_gradient_is_that_of_the_mean_loss_per_trained_token(lm, sft_data, models):
    """Two micro-batches: the step's gradient is that of (summed loss / the step's trained tokens), and
    the loss, gradient norm and counts it reports are the step's."""
    model = slm.load_model(models["plain"]).train()
    batches = iter(PackedLoader(ShardDataset(sft_data), rows=2, seed=0, epochs=None))
    micro = [next(batches), next(batches)]
    cfg = train.TrainConfig(lr=1e-3, grad_clip=1e9)
    cpu = torch.device("cpu")
    total = sum(train.micro_batch_loss(model, model, b, cpu, lm)[0] for b in micro)
    n = sum(b.n_tokens if lm else b.n_trained for b in micro)
    grads = torch.autograd.grad(total / n, list(model.parameters()))
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    result = train.train_step(micro, lm, 0.0, model, model, make_optimizers(model, cfg),
                              torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False),
                              cfg, train.Process(1, 0, 0, cpu, torch.float32))
    assert result["loss"] == pytest.approx(total.item() / n, rel=1e-6)
    assert result["gnorm"] == pytest.approx(expected_norm.item(), rel=1e-5)
    assert (result["trained"], result["tokens"]) == (n, sum(b.n_tokens for b in micro)) and result["finite"]


# ------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def run_4x2(tmp_path_factory, sft_data, models):
    """Two steps of 8 rows as 4 rows x 2 micro-batches (dropout 0): the reference of several tests."""
    out = tmp_path_factory.mktemp("run_4x2")
    run_train(["--model", str(models["plain"]), "--data", str(sft_data), "--out", str(out), *RUN_8_ROWS,
               "--batch-size", "4", "--grad-accum", "2"])
    return out


def test_loss_is_logged_and_export_matches_transformers(run_4x2):
    transformers = pytest.importorskip("transformers")
    record = losses(run_4x2)
    assert sorted(record) == [1, 2] and all(10 < v < 11.5 for v in record.values())
    assert list(losses(run_4x2, "eval_loss")) == [2]
    assert (run_4x2 / "loss.png").stat().st_size > 10_000   # what it shows: tests/test_plots.py
    final = run_4x2 / "final"
    ours = slm.load_model(final)
    theirs = transformers.OPTForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([slm.load_tokenizer(final).encode("Thought: call the weather API")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_grad_accumulation_equals_one_big_batch(run_4x2, sft_data, models, tmp_path):
    run_train(["--model", str(models["plain"]), "--data", str(sft_data), "--out", str(tmp_path), *RUN_8_ROWS,
               "--batch-size", "8", "--grad-accum", "1"])
    for key in ("loss", "eval_loss"):
        assert losses(tmp_path, key) == pytest.approx(losses(run_4x2, key), rel=1e-5)
    a, b = slm.load_model(tmp_path / "final"), slm.load_model(run_4x2 / "final")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_language_model_warmup_trains_every_token_then_the_turns(run_4x2, sft_data, models, tmp_path):
    run_train(["--model", str(models["plain"]), "--data", str(sft_data), "--out", str(tmp_path), *RUN_8_ROWS,
               "--batch-size", "4", "--grad-accum", "2", "--lm-fraction", "0.5"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["objective"] for r in lines if "loss" in r] == ["lm", "turns"]
    # The eval loss stays that of the trained turns (the same at step 2 would need the same weights).
    assert "eval_loss" in lines[-1]

    # Step 1 from scratch: the same rows as the run's, every next token within an example a target.
    dataset = ShardDataset(sft_data)
    train_idx, _ = train.split_by_query(dataset, 0.3, 0)
    loader = PackedLoader(dataset, seq_len=2048, rows=4, seed=0, indices=train_idx, epochs=None)
    model = slm.load_model(models["plain"])
    batches, total, count = iter(loader), 0.0, 0
    with torch.no_grad():
        for b in (next(batches), next(batches)):   # the step's two micro-batches
            logits = model(b.input_ids, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)
            total += F.cross_entropy(logits.flatten(0, 1), b.lm_targets.flatten(), reduction="sum").item()
            count += int((b.lm_targets != IGNORE_INDEX).sum())
    # At random init the turns' loss is close (10.8253 vs 10.8276 here): the tolerance must be tight.
    assert losses(tmp_path)[1] == pytest.approx(total / count, rel=1e-5)
    assert losses(run_4x2)[1] != pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("flags", [["--no-packing"], ["--dtype", "bf16"], ["--dtype", "fp16"]])
def test_padded_batches_and_half_precision_train(flags, sft_data, models, tmp_path):
    run_train(["--model", str(models["plain"]), "--data", str(sft_data), "--out", str(tmp_path), *flags,
               "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"])
    record = losses(tmp_path)
    assert sorted(record) == [1, 2] and all(10 < v < 11.5 for v in record.values())
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_two_process_ddp_matches_one_process(run_4x2, sft_data, models, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *BASE, "--model", str(models["plain"]), "--data", str(sft_data),
           "--out", str(tmp_path), *RUN_8_ROWS, "--batch-size", "4", "--grad-accum", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("loss", "eval_loss"):
        assert losses(tmp_path, key) == pytest.approx(losses(run_4x2, key), rel=1e-5)
    a, b = slm.load_model(tmp_path / "final"), slm.load_model(run_4x2 / "final")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_sigkill_then_resume_reproduces_every_loss(sft_data, models, tmp_path):
    # Dropout on: the resumed run must also restore the RNG to draw the same masks.
    # Muon: its momentum buffers and AdamW's moments both come back from the checkpoint.
    args = ["--model", str(models["dropout"]), "--data", str(sft_data), "--batch-size", "1",
            "--grad-accum", "2", "--max-steps", "6", "--save-every", "2", "--keep", "2", "--optimizer", "muon"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted reference runs beside the run that gets killed after step 3 is logged.
    log = open(tmp_path / "whole.log", "w")
    reference_run = subprocess.Popen(subprocess_args([*args, "--out", str(whole)]), stdout=log, stderr=log)
    proc = subprocess.Popen(subprocess_args([*args, "--out", str(killed)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 120
    while 3 not in (losses(killed) if metrics.exists() else {}):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before the kill: nothing was tested"
    assert [p.name for p in checkpoint_dirs(killed)][-1] == "step_00000002"
    assert reference_run.wait(timeout=120) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    log.close()
    reference = losses(whole)
    assert reference[6] < reference[1] - 0.05, f"loss did not fall: {reference}"

    subprocess.run(subprocess_args([*args, "--out", str(killed), "--resume"]), check=True, capture_output=True)
    assert losses(killed) == reference   # bit for bit, steps 1..6


# ------------------------------------------------------------------- kernels, checkpointing, memory

# Three steps of one 2048-token row with dropout (checkpointing must redraw the same masks), a checkpoint
# after step 2.
RUN_3_STEPS = ["--batch-size", "1", "--grad-accum", "1", "--max-steps", "3", "--save-every", "2"]


@pytest.fixture(scope="module")
def run_3(tmp_path_factory, sft_data, models):
    out = tmp_path_factory.mktemp("run_3")
    run_train(["--model", str(models["dropout"]), "--data", str(sft_data), "--out", str(out), *RUN_3_STEPS])
    return out


def test_kernels_are_resolved_printed_saved_and_run(sft_data, models, tmp_path, capsys, kernel_registry):
    reference, calls = kernels.get("linear_cross_entropy", "torch"), []

    def counted(*args, **kwargs):
        calls.append(1)
        return reference(*args, **kwargs)

    kernel_registry("linear_cross_entropy", "test_counted", counted)
    run_train(["--model", str(models["plain"]), "--data", str(sft_data), "--out", str(tmp_path),
               "--batch-size", "1", "--grad-accum", "1", "--max-steps", "1",
               "--kernels", "attention=sdpa,linear_cross_entropy=test_counted", "--attn", "eager"])  # later wins
    resolved = {"attention": "eager", "layer_norm": "torch", "linear_cross_entropy": "test_counted"}
    assert "kernels attention=eager,layer_norm=torch,linear_cross_entropy=test_counted" in capsys.readouterr().out
    assert calls == [1]     # the step's loss went through the chosen implementation
    assert json.loads((tmp_path / "train_config.json").read_text())["kernels"] == resolved
    ckpt = checkpoint_dirs(tmp_path)[-1]
    assert json.loads((ckpt / "config.json").read_text())["kernels"] == resolved


def test_cpu_default_attention_is_sdpa(run_3):
    saved = json.loads((run_3 / "train_config.json").read_text())["kernels"]
    assert saved == {"attention": "sdpa", "layer_norm": "torch", "linear_cross_entropy": "torch"}


@pytest.mark.parametrize("flags, message", [
    (["--kernels", "attention=nope"], "unknown attention implementation 'nope'; registered are attention: eager"),
    (["--kernels", "fused_mlp=triton"], "unknown op 'fused_mlp'"),
    (["--kernels", "layer_norm"], "'layer_norm' is not op=name"),
    (["--attn", "nope"], "unknown attention implementation 'nope'")])
def test_unknown_kernels_are_the_commands_error(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_losses(run_3, sft_data, models, tmp_path, capsys):
    run_train(["--model", str(models["dropout"]), "--data", str(sft_data), "--out", str(tmp_path), *RUN_3_STEPS,
               "--activation-checkpointing"])
    assert ", activation checkpointing" in capsys.readouterr().out
    assert json.loads((tmp_path / "train_config.json").read_text())["activation_checkpointing"] is True
    assert sorted(losses(run_3)) == [1, 2, 3]
    for key in ("loss", "gnorm"):
        assert losses(tmp_path, key) == losses(run_3, key)   # fp32 on CPU: bit for bit


def test_out_of_memory_names_the_fix_and_resume_continues(run_3, sft_data, models, tmp_path, kernel_registry):
    sdpa, calls = kernels.get("attention", "sdpa"), []

    def runs_out_at_step_3(q, k, v, **kwargs):   # one layer, one micro-batch: one call per step
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 23.68 GiB of which 1.02 GiB is free. (...)")
        return sdpa(q, k, v, **kwargs)

    kernel_registry("attention", "test_out_of_memory", runs_out_at_step_3)
    args = ["--model", str(models["dropout"]), "--data", str(sft_data), "--out", str(tmp_path), *RUN_3_STEPS]
    with pytest.raises(SystemExit) as stop:
        run_train([*args, "--kernels", "attention=test_out_of_memory"])
    message = str(stop.value)
    for part in ("step 3 ran out of cpu memory (Tried to allocate 20.00 GiB) with",
                 "micro-batches of 1 rows x 2048 tokens, 1 of them a step", "GiB so far",
                 "--activation-checkpointing", "--kernels linear_cross_entropy=triton", "--batch-size",
                 f"--resume continues from the last intact checkpoint, {tmp_path / 'checkpoints' / 'step_00000002'}"):
        assert part in message, message
    assert "\n" not in message and not (tmp_path / "final").exists()

    run_train([*args, "--resume"])     # attention back to the default, as the message suggests changing flags
    assert losses(tmp_path) == losses(run_3)


# ------------------------------------------------------------------------------- up-front errors


def expect_error(args: list[str], message: str):
    with pytest.raises(SystemExit, match=message):
        run_train(args)


def test_bad_inputs_fail_before_training(sft_data, models, tmp_path, opt_tokenizer):
    model = ["--model", str(models["plain"])]
    expect_error([*model, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")],
                 "not a finished shard directory")
    expect_error([*model, "--data", str(sft_data), "--out", str(tmp_path / "b"), "--max-len", "1024"],
                 "fitted to max_len 2048, expected 1024")
    other_tok = slm.train_tokenizer(["Thought: call a tool\nAction: Finish"] * 20, 300, tmp_path / "tok")
    expect_error([*model, "--tokenizer", str(other_tok.directory), "--data", str(sft_data),
                  "--out", str(tmp_path / "c")], "made with tokenizer")
    small = tiny_model(tmp_path / "small_vocab", 0.0, opt_tokenizer, vocab_size=1000)
    expect_error(["--model", str(small), "--data", str(sft_data), "--out", str(tmp_path / "d")],
                 "has 50265 ids but the model's embedding only 1000")
    (tmp_path / "file").write_text("")
    expect_error([*model, "--data", str(sft_data), "--out", str(tmp_path / "file" / "run")],
                 "is not a writable directory")
    ckpt = tmp_path / "old_run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    expect_error([*model, "--data", str(sft_data), "--out", str(tmp_path / "old_run")],
                 "already holds checkpoints")
    with pytest.raises(SystemExit):
        train.parse_args(["--no-such-flag"])


def test_non_finite_steps_are_skipped_then_stop_the_run(sft_data, opt_tokenizer, tmp_path):
    model = slm.load_model(tiny_model(tmp_path / "model", 0.0, opt_tokenizer))
    with torch.no_grad():
        model.layers[0].fc1.weight[0, 0] = float("inf")   # every forward now gives NaN
    slm.save_model(model, tmp_path / "broken", tokenizer=opt_tokenizer)
    expect_error(["--model", str(tmp_path / "broken"), "--data", str(sft_data), "--out", str(tmp_path / "run"),
                  "--batch-size", "1", "--grad-accum", "1", "--max-bad-steps", "2"],
                 "2 steps in a row had a non-finite loss or gradient")
    assert not (tmp_path / "run" / "final").exists()
