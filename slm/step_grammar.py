"""The ToolBench assistant step as an llguidance grammar: decoding that can only write a valid call.

    grammar = step_grammar.for_tokenizer(tok)                  # once per tokenizer (cached)
    matcher = grammar.matcher(functions, tool_choice="auto")   # one per prompt; functions without Finish
    matcher.mask_logits(logits_row)   # forbidden tokens -> -inf, in place (the row may be wider than the vocab)
    matcher.advance(token_id)         # after choosing the token
    matcher.done                      # the step is complete (or the matcher stopped)
    step_grammar.mask_logits(logits, [matcher, None, ...])   # (B, vocab) rows at once; None rows untouched

The step is what the model was trained to write after "Assistant: ": "\\nThought: " a thought (one line
of at most `thought_chars` characters, if given), "\\nAction: " one allowed name, "\\nAction Input: " a
JSON object valid for that name's parameters (llguidance's `%json{schema}`), then `</s>` (the
tokenizer's EOS, allowed once the step is complete). JSON whitespace is not free: ToolBench's own
steps write OpenAI's indented JSON (`{\\n  "city": "Paris"\\n}`) and some compact JSON, so whitespace
between tokens is at most a newline and `JSON_INDENT` spaces: both are accepted, and a model cannot pad
forever.

Allowed names by `tool_choice`: "auto" = the functions + Finish, "required" = the functions, {"name": X}
(or OpenAI's {"type": "function", "function": {"name": X}}) = X, "none" = Finish only. Finish follows
`slm.toolbench.FINISH_FUNCTION`'s schema.

The grammar's tokenizer is the model's (`slm.Tokenizer`) with `<s>`, `<unk>` and `<mask>` marked special
on a copy (ids unchanged): in OPT's tokenizer JSON they are ordinary tokens, which the grammar would
otherwise let the model write as text.

Not accepted, on purpose: a call to a function the prompt does not declare (one real step in ../shared
calls `dota_2_steam_web`, a tool's name), a thought that itself contains "\\nAction: " followed by
something other than an allowed name (the thought ends at its first "\\nAction: "), and a thought that
contains "\\nAction Input: " (the parser would read the arguments from there).
"""

import functools
import json
import os

import llguidance
import torch
from tokenizers import Tokenizer as _HFTokenizer

from .tokenizer import EOS_ID, load_tokenizer
from .toolbench.schemas import FINISH, FINISH_FUNCTION

MAX_THOUGHT_CHARS = 2000   # a larger bound exhausts llguidance's lexer budget (2,500 compiles, 3,000 not)
JSON_INDENT = 24       # the most spaces after a newline inside the arguments (indent 2, 12 levels deep)
_NOT_TEXT = ("<s>", "<unk>", "<mask>")


def _lark_string(text: str) -> str:
    return json.dumps(text)   # a JSON string literal is a valid Lark string literal


class StepMatcher:
    """One prompt's progress through the step grammar."""

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, grammar: str):
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"step grammar does not compile: {self._matcher.get_error()}")
        self._vocab = ll_tokenizer.vocab_size

    @property
    def done(self) -> bool:
        """The step is complete: nothing but EOS may follow (llguidance stops a finished grammar)."""
        return self._matcher.is_stopped() and not self.failed

    @property
    def failed(self) -> bool:
        """llguidance gave up on this grammar (a lexer limit, say): from here the row decodes unconstrained."""
        return self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error() or ""

    def allowed(self) -> torch.Tensor:
        """A (vocab,) bool tensor of the tokens the grammar allows next (only EOS once the step is done)."""
        return allowed([self])[0]

    def mask_logits(self, logits_row: torch.Tensor) -> None:
        """Set the logits of forbidden tokens to -inf in place (ids past the tokenizer's vocab too)."""
        mask_logits(logits_row[None], [self])

    def advance(self, token_id: int) -> None:
        """Consume the chosen token; a token the mask forbade is a ValueError (the caller skipped the mask)."""
        if self.done or self.failed:
            return
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} is not allowed by the step grammar: {self._matcher.get_error()}")


def _allowed_functions(functions: list[dict], tool_choice) -> list[dict]:
    by_name = {f["name"]: f for f in functions}
    if tool_choice == "auto":
        return [*functions, FINISH_FUNCTION]
    if tool_choice == "required":
        if not functions:
            raise ValueError('tool_choice "required" needs at least one function')
        return list(functions)
    if tool_choice == "none":
        return [FINISH_FUNCTION]
    if isinstance(tool_choice, dict):
        name = tool_choice.get("name") or tool_choice.get("function", {}).get("name")
        if name == FINISH:
            return [FINISH_FUNCTION]
        if name not in by_name:
            raise ValueError(f"tool_choice names {name!r}, which is not among the functions {sorted(by_name)}")
        return [by_name[name]]
    raise ValueError(f'tool_choice must be "auto", "required", "none" or {{"name": X}}, not {tool_choice!r}')


def _rewrite(schema, edit):
    """A copy of `schema` in which every sub-schema (items, anyOf/oneOf/allOf members, properties) is
    rewritten first, then `edit(original, copy)` changes the copy of each schema object."""
    if isinstance(schema, list):
        return [_rewrite(s, edit) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _rewrite(value, edit) if key in ("items", "anyOf", "oneOf", "allOf") else value
           for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: _rewrite(s, edit) for name, s in schema["properties"].items()}
    edit(schema, out)
    return out


def bounded(schema, chars: int = 48, items: int = 3):
    """`schema` with every value of bounded size, for decoding that must end within a token budget.

    Strings get maxLength `chars`, arrays maxItems `items`, integers a 9-digit range, objects no keys
    beyond their properties (tighter limits already there are kept). Real ToolBench arguments can be
    longer (a Finish answer), so this is for a budget, not the default.
    """
    def bound(schema, out):
        kind = schema.get("type")
        if "enum" in schema or "const" in schema:
            pass   # already finite; a length bound could forbid a listed value (Finish's "give_up_and_restart")
        elif kind == "string":
            out["maxLength"] = min(schema.get("maxLength", chars), chars)
        elif kind == "array":
            out["maxItems"] = min(schema.get("maxItems", items), items)
        elif kind in ("integer", "number"):
            out["minimum"] = max(schema.get("minimum", -10**9), -10**9)
            out["maximum"] = min(schema.get("maximum", 10**9), 10**9)
        elif kind == "object":
            out.setdefault("additionalProperties", False)

    return _rewrite(schema, bound)


def toolbench_numbers(schema):
    """`schema` with "integer" read as any number, as ToolBench's declarations mean it: its NUMBER
    parameters are declared "integer" (`slm.toolbench.schemas`), a longitude whose default is 8.79 among
    them (ToolBench's ecoweather tool), and the synthetic tasks' values such as 127.9 kg."""
    def number(schema, out):
        if schema.get("type") == "integer":
            out["type"] = "number"

    return _rewrite(schema, number)


def step_lark(functions: list[dict], tool_choice="auto", thought_chars: int | None = None,
              value_chars: int | None = None, toolbench_types: bool = False) -> str:
    """The Lark grammar of one step for `functions` (ToolBench function dicts, Finish not among them);
    `value_chars` bounds the arguments' values (`bounded`), None leaves them free; `toolbench_types`
    reads the schemas' types as ToolBench's declarations mean them (`toolbench_numbers`)."""
    if thought_chars is not None and not 0 <= thought_chars <= MAX_THOUGHT_CHARS:
        raise ValueError(f"thought_chars must be 0 to {MAX_THOUGHT_CHARS} (None: no bound), not {thought_chars}")
    whitespace = {"whitespace_pattern": f"(\n {{0,{JSON_INDENT}}})? ?"}
    calls = []
    for function in _allowed_functions(functions, tool_choice):
        schema = dict(function.get("parameters") or {"type": "object"})
        if toolbench_types:
            schema = toolbench_numbers(schema)
        if value_chars is not None:
            schema = bounded(schema, chars=value_chars)
        schema["x-guidance"] = whitespace
        calls.append(_lark_string(f"{function['name']}\nAction Input: ") + " %json" + json.dumps(schema))
    return "\n".join([
        'start: "\\nThought: " thought call',
        # Lazy: the thought ends at the first "\nAction: ", which it includes, and never holds
        # "\nAction Input: " (the parser reads the arguments from the first one). A bounded thought is one
        # line of at most thought_chars characters: a token cap would end the lexeme anywhere, and the
        # exclusion under a bound exceeds llguidance's lexer limits with vocabularies of long merges.
        "thought[lazy]: /(.|\\n)*\\nAction: / & ~/(.|\\n)*\\nAction Input: (.|\\n)*/" if thought_chars is None
        else f"thought[lazy]: /[^\\n]{{0,{thought_chars}}}\\nAction: /",
        "call: " + "\n    | ".join(calls),
    ]) + "\n"


class StepGrammar:
    """The step grammar's tokenizer for one model tokenizer; makes matchers."""

    def __init__(self, tok):
        hf = _HFTokenizer.from_str(tok._tok.to_str())
        vocab = hf.get_vocab()
        hf.add_special_tokens([name for name in _NOT_TEXT if name in vocab])   # ids unchanged
        self.ll_tokenizer = llguidance.LLTokenizer(hf.to_str(), eos_token=EOS_ID)

    def matcher(self, functions: list[dict], tool_choice="auto", thought_chars: int | None = None,
                value_chars: int | None = None, toolbench_types: bool = False) -> StepMatcher:
        """A matcher for one step. A decoder that must end within N new tokens (any model, an untrained
        one too) passes thought_chars=N // 4 (at most that many tokens) and value_chars (`bounded`);
        functions from a ToolBench prompt pass toolbench_types (see `step_lark`)."""
        return StepMatcher(self.ll_tokenizer, step_lark(functions, tool_choice, thought_chars, value_chars,
                                                        toolbench_types))


@functools.cache
def for_tokenizer(tok) -> StepGrammar:
    """The grammar for `tok`: an `slm.Tokenizer`, or a checkpoint or tokenizer directory; built once per
    tokenizer object or path."""
    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    return StepGrammar(tok)


# Byte value -> its 8 bits, least significant first: llguidance's mask is little-endian 32-bit words.
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()   # llguidance's threads (80% of the CPUs, at most 32)


def allowed(matchers: list[StepMatcher]) -> torch.Tensor:
    """(len(matchers), vocab) bool: the tokens each matcher allows next, the masks filled in parallel."""
    vocab = matchers[0]._vocab
    words = torch.zeros((len(matchers), (vocab + 31) // 32), dtype=torch.int32)
    live = [(m._matcher, i) for i, m in enumerate(matchers) if not (m.done or m.failed)]
    if live:
        # Writes row i of `words` for each (matcher, i) through its pointer: the tensor must stay contiguous.
        _executor().unsafe_compute_mask_ptr(live, words.data_ptr(), words.shape[1] * 4, len(matchers))
    rows = _BYTE_BITS[words.view(torch.uint8).long()].flatten(1)[:, :vocab]
    for i, m in enumerate(matchers):
        if m.done:   # a finished grammar may only be followed by EOS
            rows[i] = False
            rows[i, EOS_ID] = True
        elif m.failed:   # computing this mask may have been what failed: the row is free, not cut to EOS
            rows[i] = True
    return rows


def mask_logits(logits: torch.Tensor, matchers: list) -> None:
    """Mask (B, width) logits in place, row i by matchers[i]: forbidden tokens and ids past the tokenizer's
    vocabulary (an embedding padded wider) become -inf. Rows whose matcher is None are left."""
    index = [i for i, m in enumerate(matchers) if m is not None]
    if not index:
        return
    rows = allowed([matchers[i] for i in index])
    forbid = torch.zeros(logits.shape, dtype=torch.bool)
    forbid[index] = True
    vocab = min(rows.shape[1], logits.shape[-1])
    forbid[index, :vocab] = ~rows[:, :vocab]
    logits.masked_fill_(forbid.to(logits.device), float("-inf"))
