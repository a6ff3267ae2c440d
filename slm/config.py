"""OPT's hyper-parameters as a typed dataclass, read from and written to Hugging Face's `config.json`.

    cfg = OPTConfig.from_json("opt-350m/config.json")
    cfg = OPTConfig.preset("opt-350m")

Every field mirrors the `config.json` key of the same name (`remove_final_layer_norm` is
`_remove_final_layer_norm` there). Keys absent from a file take `transformers.OPTConfig`'s defaults,
which is what Hugging Face does when it loads the same file.
"""

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


@dataclass
class OPTConfig:
    vocab_size: int = 50272                # 50265 BPE entries padded to a multiple of 8 by metaseq
    hidden_size: int = 768                 # d_model
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048    # learned positions; the table has 2 more rows (offset 2)
    word_embed_proj_dim: int | None = None  # token-embedding width; != hidden_size adds project_in/out
    do_layer_norm_before: bool = True      # pre-LN; False (post-LN) only for opt-350m
    remove_final_layer_norm: bool = False  # drop the decoder's final LN (pre-LN models only)
    enable_bias: bool = True               # biases on attention and FFN linears
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    dropout: float = 0.1                   # residual dropout after out_proj and after fc2
    attention_dropout: float = 0.0         # dropout on attention probabilities
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.activation_function != "relu":
            raise ValueError(f"activation_function {self.activation_function!r}: OPT uses 'relu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        # Hugging Face builds the decoder-level LayerNorm only for pre-LN models that keep it.
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    # ------------------------------------------------------------------ config.json

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "OPTConfig":
        if d.get("model_type") != "opt":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'opt'")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "_remove_final_layer_norm" in d:
            kwargs["remove_final_layer_norm"] = d["_remove_final_layer_norm"]
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_json(cls, path: str | Path) -> "OPTConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """The config.json that `transformers.OPTForCausalLM.from_pretrained` reads."""
        d = asdict(self)
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        return {"model_type": "opt", "architectures": ["OPTForCausalLM"], **d,
                "activation_dropout": 0.0, "layerdrop": 0.0, "tie_word_embeddings": True}

    # ------------------------------------------------------------------ presets

    @classmethod
    def preset(cls, name: str, **overrides) -> "OPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown OPT preset {name!r}; known: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


# The released sizes (from their hub config.json files); only 350m is post-LN with a 512-wide
# embedding projected to 1024.
PRESETS = {
    "opt-125m": OPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": OPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                          word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": OPTConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": OPTConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": OPTConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "opt-30b": OPTConfig(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    "opt-66b": OPTConfig(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864),
}
