"""Token ids and the loss mask of a conversation, built together as its segments are appended.

    ids, mask = toolbench.tokenize(row, tok, max_len=2048)        # training example, fitted
    prompt = toolbench.prompt_ids(history, tok, max_len=2048, reserve=256)   # the evaluator's prompt

The rendering rule (train and serve agree token for token)
-----------------------------------------------------------
A sequence is id 2 (OPT's BOS) followed by every message as "{Role}: " + value + terminator, where the
terminator is "\\n" for system, user and function messages and the single token `</s>` (id 2) for
**every** assistant message. ToolBench's own text (`toolbench.render`) ends only the final assistant
turn with `</s>` and earlier ones with "\\n"; we close every assistant turn with `</s>` because
collapsing trains several turns in one sequence, each of which must teach the model to stop, and the
evaluator renders its history the same way. Each role prefix, each value and each terminator is
encoded on its own, so no BPE token straddles two of them: the prompt for a turn is exactly the
training prefix that precedes that turn's value.

Loss mask (1 = trained): the value tokens and the closing `</s>` of trained assistant turns; 0 on the
BOS, role prefixes, system/user/function text and history assistant turns. Each segment's mask is
written as the segment is appended (`render_ids`), never recovered afterwards.

Examples of a trajectory
------------------------
Levels (levels.py) never decrease along a trajectory, so a collapsed trajectory is cut into runs of
turns that need the same level (0-5); each run is one example, earlier turns being untrained history.
A level-6 turn is an example of its own. Hence every trained turn's prompt is exactly
`prompt_ids(history, tok, max_len, reserve=len(target) + 1)`; the evaluator calls it with `reserve`
= its generation budget.
"""

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from .collapse import Chain
from .levels import LEVELS, Level, message_text
from .readers import BadRow, check_row, query_of
from .template import ROLES


class SegmentEncoder:
    """Encodes messages segment by segment (role prefix, value, terminator), with a cache of values."""

    def __init__(self, tok, cache_size: int = 1024):
        self.tok = tok
        self.bos, self.eos = tok.bos_id, tok.eos_id   # both 2 (`</s>`) for OPT
        self.prefix = {role: tok.encode(f"{name}: ", add_bos=False) for role, name in ROLES.items()}
        self.newline = tok.encode("\n", add_bos=False)
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.cache_size = cache_size

    def text(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_bos=False)
            self._cache[text] = ids
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(text)
        return ids

    def prefetch(self, texts: list[str]) -> None:
        """Encode the uncached texts in one batch (the tokenizers library spreads it over threads)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if len(missing) > 1 and hasattr(self.tok, "encode_batch"):
            for text, ids in zip(missing, self.tok.encode_batch(missing, add_bos=False)):
                self._cache[text] = ids
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def segments(self, message: dict, level: Level) -> tuple[list[int], list[int], list[int]]:
        """(role prefix, value, terminator) of one message at `level`, each encoded on its own."""
        role = message["from"]
        end = [self.eos] if role == "assistant" else self.newline
        return self.prefix[role], self.text(message_text(message, level)), end

    def message_len(self, message: dict, level: Level) -> int:
        return sum(map(len, self.segments(message, level)))


@lru_cache(maxsize=8)
def encoder_for(tok) -> SegmentEncoder:
    return SegmentEncoder(tok)


# --------------------------------------------------------------------------------------------------
# Fitting one prompt


def _steps(history: list[dict]) -> list[list[int]]:
    """History message indices grouped into droppable steps: an assistant turn and what follows it.

    The messages before the first assistant turn (system, the query) are never dropped.
    """
    steps: list[list[int]] = []
    for i, message in enumerate(history):
        if message["from"] == "assistant":
            steps.append([i])
        elif steps:
            steps[-1].append(i)
    return steps


def fit_prompt(history: list[dict], enc: SegmentEncoder, budget: int):
    """(level index, kept message indices) for the first level where BOS + history + "Assistant: " <= budget.

    None when even the last level, with every droppable step gone, does not fit.
    """
    kept = list(range(len(history)))
    prefix = 1 + len(enc.prefix["assistant"])
    for index, level in enumerate(LEVELS):
        enc.prefetch([message_text(m, level) for m in history])
        lengths = [enc.message_len(m, level) for m in history]
        total = prefix + sum(lengths)
        if not level.drop_turns:
            if total <= budget:
                return index, kept
            continue
        for step in _steps(history):
            if total <= budget:
                break
            total -= sum(lengths[i] for i in step)
            kept = [i for i in kept if i not in step]
        if total <= budget:
            return index, kept
    return None


def render_ids(conversations: list[dict], level: Level, enc: SegmentEncoder, trained=()) -> tuple[list[int], list[int]]:
    """BOS + every message at `level`; mask 1 on the value and </s> of the assistant turns in `trained`."""
    ids, mask = [], []

    def add_tokens(tokens: list[int], train: bool) -> None:   # nanochat's pattern: the mask grows with the ids
        ids.extend(tokens)
        mask.extend([int(train)] * len(tokens))

    add_tokens([enc.bos], False)
    for i, message in enumerate(conversations):
        prefix, value, end = enc.segments(message, level)
        add_tokens(prefix, False)
        add_tokens(value, i in trained)
        add_tokens(end, i in trained)      # an assistant turn's </s>: the model learns to stop
    return ids, mask


def prompt_ids(history: list[dict], tok, max_len: int = 2048, reserve: int = 256) -> list[int]:
    """The evaluator's prompt: BOS + the history + "Assistant: ", fitted to leave `reserve` tokens.

    `history` is the conversation so far (system, user, then assistant/function turns; an assistant
    value is the step text without `</s>`). Fitting is the training fitting, so a prompt equals the
    training prefix of the same turn whenever `reserve` equals that turn's target length + 1.
    Raises ValueError when the prompt cannot fit.
    """
    enc = encoder_for(tok)
    fitted = fit_prompt(history, enc, max_len - reserve)
    if fitted is None:
        raise ValueError(f"prompt of {len(history)} messages cannot fit {max_len} tokens with {reserve} "
                         "reserved for the reply, even with the API list at its shortest")
    index, kept = fitted
    ids, _ = render_ids([history[i] for i in kept], LEVELS[index], enc)
    return ids + enc.prefix["assistant"]


@dataclass
class Example:
    """One training sequence: ids, loss mask (1 = trained), the fitting level and its trained turns."""

    ids: list[int]
    mask: list[int]
    level: int          # index into LEVELS
    turns: int          # trained assistant turns in it


def tokenize_chain(chain: Chain, enc: SegmentEncoder, max_len: int = 2048):
    """(examples, number of trained turns dropped as too long) for one chain (see "Examples" above)."""
    conv = chain.conversations
    plan = []  # (turn, level index, kept indices) in turn order
    dropped = 0
    for turn in sorted(chain.trained):
        target = len(enc.text(conv[turn]["value"])) + 1
        fitted = fit_prompt(conv[:turn], enc, max_len - target)
        if fitted is None:
            dropped += 1
        else:
            plan.append((turn, *fitted))
    examples = []
    i = 0
    while i < len(plan):
        turn, level, kept = plan[i]
        if LEVELS[level].drop_turns:
            ids, mask = render_ids([conv[k] for k in kept] + [conv[turn]], LEVELS[level], enc, {len(kept)})
            examples.append(Example(ids, mask, level, 1))
            i += 1
            continue
        run = [turn]
        while i + 1 < len(plan) and plan[i + 1][1] == level:
            i += 1
            run.append(plan[i][0])
        ids, mask = render_ids(conv[: run[-1] + 1], LEVELS[level], enc, set(run))
        examples.append(Example(ids, mask, level, len(run)))
        i += 1
    return examples, dropped


def tokenize(row: dict, tok, max_len: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one row, its final assistant turn trained, fitted to `max_len`.

    Raises `BadRow` (reason `too_long`) when the target cannot fit, and for malformed rows.
    """
    check_row(row)
    conv = row["conversations"]
    examples, _ = tokenize_chain(Chain(row["id"], query_of(row), conv, {len(conv) - 1}, 1), encoder_for(tok), max_len)
    if not examples:
        raise BadRow("too_long", f"{row['id'][:80]!r}: its final turn cannot fit {max_len} tokens")
    return examples[0].ids, examples[0].mask
