"""Small OPT checkpoints in the Hugging Face Hub's layouts, with random weights, for tests.

    hf, path = make_checkpoint(tmp_path, TINY_CONFIGS["post_ln_proj"], layout="hub350m")

The weights come from `transformers.OPTForCausalLM` (the reference) with every parameter randomised,
LayerNorms and biases included, so parity tests exercise every term.
"""

import json

import torch
from safetensors.torch import save_file

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=48)
TINY_CONFIGS = {
    "pre_ln": dict(TINY, do_layer_norm_before=True),
    "post_ln_proj": dict(TINY, do_layer_norm_before=False, word_embed_proj_dim=16),  # opt-350m's shape
    "no_bias_no_final_ln": dict(TINY, enable_bias=False, _remove_final_layer_norm=True),
    "no_affine_ln": dict(TINY, layer_norm_elementwise_affine=False, num_attention_heads=2),
}
# The exact opt-350m config.json (docs/OPT.md section 1).
OPT_350M = dict(
    activation_dropout=0.0, activation_function="relu", attention_dropout=0.0, bos_token_id=2,
    do_layer_norm_before=False, dropout=0.1, eos_token_id=2, ffn_dim=4096, hidden_size=1024,
    init_std=0.02, layerdrop=0.0, max_position_embeddings=2048, num_attention_heads=16,
    num_hidden_layers=24, pad_token_id=1, vocab_size=50272, word_embed_proj_dim=512,
)
LAYOUTS = ("safetensors", "sharded", "bin", "hub350m")


def random_hf_model(config_kwargs: dict, seed: int = 0, std: float = 0.05):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**config_kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return model


def make_checkpoint(directory, config_kwargs: dict, layout: str = "safetensors", seed: int = 0):
    """Write a random OPT in `layout`; return (the transformers model, the directory).

    layouts: safetensors (`model.decoder.*` + lm_head, one file), sharded (an index and two shards),
    bin (only pytorch_model.bin), hub350m (opt-350m's hub file: `decoder.*` keys, fp16, no lm_head).
    """
    hf = random_hf_model(config_kwargs, seed)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "opt", "architectures": ["OPTForCausalLM"], **config_kwargs}
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    if layout == "safetensors":
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for file, names in shards.items():
            save_file({k: state[k] for k in names}, str(directory / file), metadata={"format": "pt"})
        weight_map = {k: file for file, names in shards.items() for k in names}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif layout == "hub350m":
        state = {k.removeprefix("model."): v.half() for k, v in state.items() if k != "lm_head.weight"}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        hf = hf.half().float()  # the reference sees the same fp16-rounded weights
    else:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    return hf, directory
