"""OPT's tokenizer: GPT-2 byte-level BPE merges with OPT's (fairseq) vocabulary ids.

    tok = load_tokenizer("path/with/vocab.json+merges.txt")
    tok.encode("Hello world", add_bos=True)   # [2, 31414, 232]
    tok.decode([2, 31414, 232])               # "</s>Hello world"

Built on the `tokenizers` library. Like Hugging Face's OPT tokenizer it prepends `</s>` (id 2, OPT's
BOS) rather than `<s>`, adds no prefix space, and treats the literal text `</s>` as the single id 2:
ToolBench's template closes assistant turns with `</s>`, and that must be one token, never its BPE
pieces. `train_tokenizer` builds a small tokenizer of the same kind (same special ids) from a corpus,
for the offline smoke run.
"""

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# OPT's special tokens and their fixed ids; a trained tokenizer reuses them so the model config
# (pad_token_id=1, bos/eos_token_id=2) holds for both.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 1, 2, 2
FILES = ("vocab.json", "merges.txt")


class Tokenizer:
    """Byte-level BPE over `vocab.json` + `merges.txt`, with OPT's conventions."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        missing = [name for name in FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"tokenizer directory {directory} lacks {', '.join(missing)}: expected vocab.json and "
                "merges.txt (OPT's are in the facebook/opt-350m hub repo)"
            )
        self.directory = directory
        vocab_path, merges_path = (str(directory / name) for name in FILES)
        try:
            bpe = models.BPE.from_file(vocab_path, merges_path)
        except Exception as err:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"cannot read BPE files in {directory}: {err}") from err
        self._tok = _HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        # Hugging Face's OPT tokenizer treats `</s>` and `<pad>` as special: never split into pieces.
        self._tok.add_special_tokens(["</s>", "<pad>"])
        vocab = self._tok.get_vocab()
        for token, expected in (("<pad>", PAD_ID), ("</s>", EOS_ID)):
            if vocab.get(token) != expected:
                raise ValueError(
                    f"{vocab_path}: {token!r} has id {vocab.get(token)}, expected {expected} as in OPT"
                )
        self.vocab_size = self._tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        digest = hashlib.sha256()
        for name in FILES:
            digest.update((directory / name).read_bytes())
        self.fingerprint = digest.hexdigest()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = True) -> list[list[int]]:
        """Many texts at once, in parallel threads inside the tokenizers library."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encodings]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | Path) -> None:
        """Copy vocab.json and merges.txt into `directory` (byte for byte, so the fingerprint holds)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (directory / name).resolve() != (self.directory / name).resolve():
                (directory / name).write_bytes((self.directory / name).read_bytes())

    def __repr__(self) -> str:
        return f"Tokenizer({self.directory}, vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer(directory)


def train_tokenizer(texts, vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE on an iterable of strings; write vocab.json + merges.txt to out_dir.

    The special tokens take OPT's ids 0..3 (the trainer assigns them first, in order), so a model
    built for it keeps OPT's pad/bos/eos ids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.model.save(str(out_dir))
    return Tokenizer(out_dir)
