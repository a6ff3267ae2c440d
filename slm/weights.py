"""Hugging Face checkpoints in and out: `load_model` and `save_model`.

    model = load_model("facebook/opt-350m", dtype=torch.bfloat16, device="cuda")  # hub id or local dir
    save_model(model, "out/final", tokenizer=tok)   # transformers.OPTForCausalLM.from_pretrained loads it

A checkpoint directory holds `config.json` and the weights as `model.safetensors`, as shards listed in
`model.safetensors.index.json`, or only as `pytorch_model.bin` (converted once to `model.safetensors`
beside it, read with `weights_only=True`). Keys may start `decoder.` (the opt-350m hub file, fp16,
without `lm_head.weight`) or `model.decoder.`; the head is tied to the token embedding.

Every name goes through one table, `hf_keys`, in both directions; our fused q/k/v projection is Hugging
Face's q_proj, k_proj and v_proj, concatenated by rows on load and split on save (`to_hf`, `from_hf`).
The model is built on the meta device and the checkpoint's tensors are assigned to it; all checks run
before the model is touched, so a bad checkpoint never yields a half-loaded model.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .chat import CHAT_TEMPLATE
from .config import OPTConfig
from .model import OPT

SAFETENSORS, INDEX, PYTORCH_BIN, CONFIG = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# Our module name -> Hugging Face's, inside a decoder layer and at the decoder's top level. A tuple: our
# module fuses those, stacked by rows in that order (its weight (3d, d) is q_proj's, k_proj's, v_proj's).
LAYER_KEYS = {
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.o": "self_attn.out_proj", "attn_norm": "self_attn_layer_norm",
    "fc1": "fc1", "fc2": "fc2", "ffn_norm": "final_layer_norm",
}
TOP_KEYS = {
    "tok_embed": "embed_tokens", "pos_embed": "embed_positions", "project_in": "project_in",
    "project_out": "project_out", "final_norm": "final_layer_norm",
}


def hf_keys(name: str) -> tuple[str, ...]:
    """Our parameter name -> its `model.decoder.*` name(s) in a Hugging Face OPTForCausalLM: several for
    a fused parameter, in the order of its row blocks."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        hf = LAYER_KEYS[inner]
        return tuple(f"model.decoder.layers.{index}.{m}.{param}" for m in ((hf,) if isinstance(hf, str) else hf))
    return (f"model.decoder.{TOP_KEYS[module]}.{param}",)


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (or gradients by name) -> Hugging Face's keys, fused parameters split into views."""
    out = {}
    for name, t in state.items():
        keys = hf_keys(name)
        out.update(zip(keys, t.chunk(len(keys))))
    return out


def from_hf(tensors: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """Hugging Face's tensors -> ours for the parameter `names`, fused ones concatenated by rows."""
    return {name: tensors[keys[0]] if len(keys := hf_keys(name)) == 1 else torch.cat([tensors[k] for k in keys])
            for name in names}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with a sentence saying which file and what was expected."""


# ----------------------------------------------------------------------------------- locating

def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is ("~" expanded); a hub id such as `facebook/opt-350m` downloaded into the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name} is not a checkpoint directory (expected a folder with "
                              f"{CONFIG} and {SAFETENSORS} or {PYTORCH_BIN}, or a hub id like facebook/opt-350m)")
    from huggingface_hub import snapshot_download  # ships with tokenizers

    wanted = [CONFIG, "*.safetensors", INDEX, *TOKENIZER_FILES]
    try:
        local = Path(snapshot_download(name, allow_patterns=wanted))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(name, allow_patterns=[*wanted, PYTORCH_BIN]))
    except Exception as err:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"could not download {name} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"On a machine with access run `huggingface-cli download {name} --local-dir DIR` "
            f"(or fetch {CONFIG}, {SAFETENSORS} or {PYTORCH_BIN}, vocab.json and merges.txt from "
            f"https://huggingface.co/{name}) and pass DIR instead of the hub id") from err
    return local


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX).is_file():
        try:
            index = json.loads((directory / INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{directory / INDEX}: expected JSON with a 'weight_map' "
                                  f"of key -> shard file ({err})") from err
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{directory / INDEX} lists shards missing from {directory}: {missing}")
        return [directory / s for s in shards]
    if (directory / SAFETENSORS).is_file():
        return [directory / SAFETENSORS]
    if (directory / PYTORCH_BIN).is_file():
        return [_convert_bin(directory / PYTORCH_BIN)]
    raise CheckpointError(f"{directory} holds no weights: expected {SAFETENSORS}, {INDEX} or {PYTORCH_BIN}")


def _convert_bin(bin_path: Path) -> Path:
    """Convert pytorch_model.bin to safetensors once; later loads read the safetensors file."""
    target = bin_path.with_name(SAFETENSORS)
    if not os.access(bin_path.parent, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slm" / "converted"
        key = hashlib.sha256(str(bin_path.resolve()).encode()).hexdigest()[:16]
        target = cache / key / SAFETENSORS
        if target.is_file():
            return target
    try:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{bin_path} could not be read as a PyTorch state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{bin_path}: expected a dict of tensor name -> tensor")
    # safetensors refuses shared storage (the bin may tie lm_head to embed_tokens): store copies.
    state = {k: v.contiguous().clone() for k, v in state.items()}
    _atomic_save(state, target)
    return target


# ------------------------------------------------------------------------------------- loading

def _normalise(key: str) -> str:
    """`decoder.*` (opt-350m's hub file) and `model.decoder.*` both become `model.decoder.*`."""
    return "model." + key if key.startswith("decoder.") else key


def _read_tensors(files: list[Path], dtype, device) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensors[_normalise(key)] = f.get_tensor(key).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{err}") from err
    return tensors


def _check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], source: str) -> None:
    """One error naming every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k])}"
                  for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise CheckpointError(f"{source} does not fit its config.json: " + "; ".join(problems))


def load_model(path, dtype=torch.float32, device="cpu", attn: str = "sdpa", kernels: dict[str, str] | None = None,
               activation_checkpointing: bool = False) -> OPT:
    """An OPT in eval mode with the weights of a Hugging Face checkpoint (directory or hub id); attn, kernels
    and activation_checkpointing as slm.OPT takes them."""
    directory = resolve_checkpoint(path)
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG}: expected a Hugging Face OPT checkpoint directory")
    config = OPTConfig.from_json(directory / CONFIG)
    tensors = _read_tensors(_weight_files(directory), dtype, device)

    with torch.device("meta"):
        model = OPT(config, attn=attn, kernels=kernels, activation_checkpointing=activation_checkpointing)
    head = tensors.pop("lm_head.weight", None)
    _check_keys({key: t.shape for key, t in to_hf(model.state_dict()).items()}, tensors, str(directory))
    embed = tensors["model.decoder.embed_tokens.weight"]
    if head is not None and not torch.equal(head, embed):
        raise CheckpointError(f"{directory}: lm_head.weight differs from embed_tokens.weight, but OPT "
                              "ties them; this checkpoint is not an OPT model slm can represent")
    model.load_state_dict(from_hf(tensors, model.state_dict()), strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------- saving

def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})  # transformers requires the format tag
    os.replace(tmp, path)


def save_model(model: OPT, out_dir, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer's files) in Hugging Face's layout.

    `tokenizer` is an `slm.Tokenizer` or a directory holding vocab.json and merges.txt. The head is
    not stored: transformers ties it to `embed_tokens`, as the hub checkpoints do.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: t.detach().to("cpu").contiguous() for key, t in to_hf(model.state_dict()).items()}
    _atomic_save(state, out_dir / SAFETENSORS)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.tok_embed.weight.dtype).removeprefix("torch.")
    tmp = out_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / CONFIG)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)
    return out_dir


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    from .tokenizer import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    tok.save(out_dir)
    if tok.isolate is not None:
        # Merges across words: transformers' GPT2Tokenizer cannot reproduce it, so no tokenizer_config.json;
        # the chat template still ships, as transformers' standalone chat_template.jinja file.
        (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        return
    # What transformers' AutoTokenizer needs to build OPT's tokenizer from vocab.json + merges.txt.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,   # apply_chat_template renders what slm.chat.render renders
    }, indent=2) + "\n")
