"""OPT's tokenizer: GPT-2 byte-level BPE merges with OPT's (fairseq) vocabulary ids.

    tok = load_tokenizer("path/with/vocab.json+merges.txt")
    tok.encode("Hello world", add_bos=True)   # [2, 31414, 232]
    tok.decode([2, 31414, 232])               # "</s>Hello world"

Built on the `tokenizers` library. Like Hugging Face's OPT tokenizer it prepends `</s>` (id 2, OPT's
BOS) rather than `<s>`, adds no prefix space, and treats the literal text `</s>` as the single id 2:
ToolBench's template closes assistant turns with `</s>`, and that must be one token, never its BPE
pieces. `train_tokenizer` builds a small tokenizer of the same kind (same special ids) from a corpus,
for the offline smoke run.

Word splitting: OPT (like GPT-2) first splits text into words and never merges across them. A trained
tokenizer may instead let merges span words (`isolate=<regex>`, recorded in `pretokenizer.json` beside
the BPE files): on a corpus where ToolBench's long, fixed instructions repeat in every example, whole
phrases become single tokens and an example shrinks about 5x, which is what lets the smoke run train on
a CPU in minutes. What the regex matches is never merged with its surroundings, so it gets the same
tokens wherever it appears; `NAMES` isolates names, the parts of function names and numbers, the things
a tool-calling model copies (from the query, the schema or an observation into a call or an answer).
Without that file a directory is read as OPT's, words split.
"""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# OPT's special tokens and their fixed ids; a trained tokenizer reuses them so the model config
# (pad_token_id=1, bos/eos_token_id=2) holds for both.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 1, 2, 2
FILES = ("vocab.json", "merges.txt")
PRETOKENIZER_FILE = "pretokenizer.json"  # {"isolate": regex} for a tokenizer whose merges span words
# What a tool-calling model copies: words with a capital (entities), the parts of snake_case names
# (city_, population_, for_, zabrus_, cities) and digit runs. A part keeps the `_` that follows it, so
# a tool's name has the same tokens in the tool list ("1.zabrus_cities"), in the schema's descriptions
# and inside every function name ("city_population_for_zabrus_cities"): each is a source to copy from.
_CAPITAL_WORD = r"[A-Za-z]*[A-Z][A-Za-z]*"
_CAPITALISED = r"(?<![A-Za-z]){common}" + _CAPITAL_WORD
_PIECES = r"|[a-z]+_(?=[a-z])|(?<=_)[a-z]+|[0-9]+"
NAMES = _CAPITALISED.format(common="") + _PIECES


def names_pattern(texts, min_share: float = 0.02) -> str:
    """NAMES, less the capitalised words found in at least `min_share` of `texts`.

    Those are the corpus's own vocabulary (ToolBench's "Action", "Thought", "Finish" ...), not names to
    copy; left free to merge with their neighbours, the fixed instructions become far fewer tokens.
    """
    texts = list(texts)
    seen = Counter()
    for text in texts:
        seen.update(set(re.findall(_CAPITAL_WORD, text)))
    common = sorted((w for w, n in seen.items() if n >= min_share * len(texts)), key=lambda w: (-len(w), w))
    if not common:
        return NAMES
    return _CAPITALISED.format(common=f"(?!(?:{'|'.join(common)})(?![A-Za-z]))") + _PIECES


class Tokenizer:
    """Byte-level BPE over `vocab.json` + `merges.txt`, with OPT's conventions."""

    def __init__(self, directory: str | Path):
        directory = Path(directory).expanduser()
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
        self.files = [directory / name for name in (*FILES, PRETOKENIZER_FILE)
                      if (directory / name).is_file()]
        self.isolate = _read_isolate(directory / PRETOKENIZER_FILE)
        self._tok = _HFTokenizer(bpe)
        self._tok.pre_tokenizer = _pre_tokenizer(self.isolate)
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
        for file in self.files:
            digest.update(file.read_bytes())
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
        """Copy the tokenizer's files into `directory` (byte for byte, so the fingerprint holds)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            if (directory / file.name).resolve() != file.resolve():
                (directory / file.name).write_bytes(file.read_bytes())

    def __repr__(self) -> str:
        return f"Tokenizer({self.directory}, vocab_size={self.vocab_size})"


def _pre_tokenizer(isolate: str | None):
    if isolate is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(isolate), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _read_isolate(path: Path) -> str | None:
    """The `isolate` regex of a pretokenizer.json; None (OPT's word splitting) when there is no file."""
    if not path.is_file():
        return None
    try:
        isolate = json.loads(path.read_text())["isolate"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{\"isolate\": \"<regex>\"}} ({err!r})") from err
    if not isinstance(isolate, str) or not isolate:
        raise ValueError(f"{path}: isolate must be a non-empty regex string, found {isolate!r}")
    try:
        Regex(isolate)
    except Exception as err:  # the tokenizers library raises a bare Exception on a bad pattern
        raise ValueError(f"{path}: isolate is not a valid regex: {err}") from err
    return isolate


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer(directory)


def train_tokenizer(texts, vocab_size: int, out_dir: str | Path, isolate: str | None = None,
                    max_token_chars: int = 64) -> Tokenizer:
    """Train a byte-level BPE on an iterable of strings; write vocab.json + merges.txt to out_dir.

    The special tokens take OPT's ids 0..3 (the trainer assigns them first, in order), so a model
    built for it keeps OPT's pad/bos/eos ids. With `isolate` (a regex: `NAMES`, `names_pattern`)
    merges span words but never what the regex matches (see the module docstring), up to tokens of
    `max_token_chars` characters.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(isolate)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_chars,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.model.save(str(out_dir))
    if isolate is not None:
        (out_dir / PRETOKENIZER_FILE).write_text(json.dumps({"isolate": isolate}) + "\n")
    return Tokenizer(out_dir)
