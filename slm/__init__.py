"""slm: OPT written from scratch, fine-tuned on ToolBench tool calls, evaluated offline.

    import slm
    model = slm.load_model("facebook/opt-350m", dtype=torch.bfloat16, device="cuda", attn="triton")
    model = slm.OPT(config, kernels={"attention": "triton"}, activation_checkpointing=True)  # kernels: see kernels/
    tok = slm.load_tokenizer("path/to/opt-350m")
    new_tokens = slm.generate(model, [tok.encode("Hello")], max_new_tokens=20)
    prompt = slm.chat.render(messages, tools)     # an OpenAI-style conversation as the training text (chat.py)
"""

from . import chat
from .config import OPTConfig
from .generate import generate
from .model import OPT, KVCache
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .weights import CheckpointError, load_model, save_model

__all__ = [
    "OPTConfig", "OPT", "KVCache", "Tokenizer", "load_tokenizer", "train_tokenizer",
    "CheckpointError", "load_model", "save_model", "generate", "chat",
]
