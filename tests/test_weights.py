"""Loading every checkpoint layout users have, exporting for transformers, and every bad-input error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import slm
from checkpoints import LAYOUTS, TINY_CONFIGS, make_checkpoint

CONFIG = TINY_CONFIGS["post_ln_proj"]


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids) if isinstance(model, slm.OPT) else model(input_ids=ids).logits
    return out.float()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_with_reference_logits(tmp_path, layout):
    hf, path = make_checkpoint(tmp_path, CONFIG, layout=layout)
    model = slm.load_model(path)
    ids = torch.randint(3, 96, (2, 7))
    torch.testing.assert_close(logits_of(model, ids), logits_of(hf, ids), atol=1e-4, rtol=0)
    assert model.lm_head_weight is model.tok_embed.weight  # tied head
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_pytorch_bin_is_converted_once(tmp_path):
    _, path = make_checkpoint(tmp_path, CONFIG, layout="bin")
    slm.load_model(path)
    converted = path / "model.safetensors"
    assert converted.is_file()
    stamp = converted.stat().st_mtime_ns
    (path / "pytorch_model.bin").unlink()  # later loads need only the safetensors file
    slm.load_model(path)
    assert converted.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_applied(tmp_path, dtype):
    _, path = make_checkpoint(tmp_path, CONFIG, layout="hub350m")
    model = slm.load_model(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_round_trip_through_transformers(tmp_path, opt_tokenizer):
    from transformers import OPTForCausalLM

    _, path = make_checkpoint(tmp_path / "in", CONFIG, layout="hub350m")
    model = slm.load_model(path)
    out = slm.save_model(model, tmp_path / "out", tokenizer=opt_tokenizer)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    reloaded_hf = OPTForCausalLM.from_pretrained(out).eval()
    reloaded = slm.load_model(out)
    ids = torch.randint(3, 96, (2, 9))
    torch.testing.assert_close(logits_of(reloaded_hf, ids), logits_of(model, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids), atol=0, rtol=0)
    assert slm.load_tokenizer(out).fingerprint == opt_tokenizer.fingerprint


def test_exported_tokenizer_loads_in_transformers(tmp_path, opt_tokenizer):
    from transformers import AutoTokenizer

    _, path = make_checkpoint(tmp_path / "in", CONFIG)
    out = slm.save_model(slm.load_model(path), tmp_path / "out", tokenizer=opt_tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Hello world! Thought: call it</s>"
    assert hf_tok(text)["input_ids"] == opt_tokenizer.encode(text)


def test_hub_id_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(slm.CheckpointError, match=r"facebook/opt-350m.*--local-dir DIR"):
        slm.load_model("facebook/opt-350m")


# ------------------------------------------------------------------------------ bad input

def edit_weights(path, edit):
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_mismatched_keys_in_one_error(tmp_path):
    _, path = make_checkpoint(tmp_path, CONFIG)

    def edit(state):
        del state["model.decoder.layers.0.fc1.bias"]
        state["model.decoder.layers.0.extra.weight"] = torch.zeros(2)
        state["model.decoder.layers.1.fc2.weight"] = torch.zeros(32, 63)

    edit_weights(path, edit)
    with pytest.raises(slm.CheckpointError) as err:
        slm.load_model(path)
    message = str(err.value)
    assert "missing keys ['model.decoder.layers.0.fc1.bias']" in message
    assert "unexpected keys ['model.decoder.layers.0.extra.weight']" in message
    assert "model.decoder.layers.1.fc2.weight: checkpoint (32, 63), model (32, 64)" in message


def test_untied_head_is_refused(tmp_path):
    _, path = make_checkpoint(tmp_path, CONFIG)
    edit_weights(path, lambda s: s.__setitem__("lm_head.weight", s["lm_head.weight"] + 1))
    with pytest.raises(slm.CheckpointError, match="lm_head.weight differs from embed_tokens"):
        slm.load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    _, path = make_checkpoint(tmp_path, CONFIG)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 20)
    with pytest.raises(slm.CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        slm.load_model(path)


def test_corrupt_pytorch_bin_names_the_file(tmp_path):
    _, path = make_checkpoint(tmp_path, CONFIG, layout="bin")
    (path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(slm.CheckpointError, match="pytorch_model.bin could not be read"):
        slm.load_model(path)


def test_missing_shard_is_named(tmp_path):
    _, path = make_checkpoint(tmp_path, CONFIG, layout="sharded")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(slm.CheckpointError, match="lists shards missing.*model-00002-of-00002"):
        slm.load_model(path)


def test_directory_without_config_or_weights(tmp_path):
    _, path = make_checkpoint(tmp_path / "a", CONFIG)
    (path / "config.json").unlink()
    with pytest.raises(slm.CheckpointError, match="has no config.json"):
        slm.load_model(path)
    empty = tmp_path / "b"
    empty.mkdir()
    shutil.copy(tmp_path / "a" / "model.safetensors", empty / "unrelated.bin")
    (empty / "config.json").write_text(json.dumps({"model_type": "opt", **CONFIG}))
    with pytest.raises(slm.CheckpointError, match="holds no weights"):
        slm.load_model(empty)


def test_config_that_is_not_opt(tmp_path):
    _, path = make_checkpoint(tmp_path, CONFIG)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'gpt2', expected 'opt'"):
        slm.load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        slm.load_model(path)


def test_not_a_directory_or_hub_id(tmp_path):
    with pytest.raises(slm.CheckpointError, match="is not a checkpoint directory"):
        slm.load_model(tmp_path / "nowhere" / "deep")


def test_config_presets_and_json_round_trip(tmp_path):
    cfg = slm.OPTConfig.preset("opt-350m")
    assert (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.do_layer_norm_before) == (1024, 512, False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    assert slm.OPTConfig.from_json(path) == cfg
    with pytest.raises(ValueError, match="unknown OPT preset 'opt-7b'"):
        slm.OPTConfig.preset("opt-7b")
