"""One request's step, token by token, as chat-completion deltas: what a stream sends and what an answer holds.

    stream = StepStream(tok, stop=["\\n\\n"])
    deltas = stream.push(token)                      # per new token (not </s>): [{"reasoning_content": "..."}, ...]
    deltas, finish_reason = stream.end(complete)     # once the row ended; stream.message is the whole answer

The model writes one ToolBench step, "\\nThought: T\\nAction: NAME\\nAction Input: {json}" then `</s>`
(under slm.step_grammar, always in this shape). A token's deltas are what it makes certain:
- the Thought as `reasoning_content` while it is decoded (for Finish as for a tool: the message keeps it
  there too), held back only while its end could be the start of "\\nAction: ";
- Finish's final answer as `content`, decoded from its JSON string as it is written;
- for a tool, nothing more until the step is complete (`end(complete=True)`: `</s>` came, or the grammar
  ended): then one call, its name whole, then its arguments in fragments. The arguments are the JSON the
  model wrote, outer whitespace removed (valid for the tool's schema: the grammar allowed nothing else).
  Waiting costs the arguments' liveness and buys the rule that a step cut by max_tokens or a stop
  sequence never comes back as a call, in a stream too: what a stream sent cannot be taken back.
Text is released in whole characters only (a multi-byte character can span tokens) and never while it
could be the start of a stop sequence; a stop sequence ends the completion before it (finish_reason
"stop"), matched against the step's text as the model writes it.

`message` accumulates the deltas as a client does (`role` first, strings appended), so a streamed answer
reassembles into the non-streamed one by construction.
"""

import json
import re
import uuid

from ..toolbench.parse import ACTION, ACTION_INPUT as INPUT, THOUGHT
from ..toolbench.schemas import FINISH

ARGUMENT_FRAGMENT_CHARS = 16
_ANSWER_KEY = re.compile(r'"final_answer"\s*:\s*"')
_MAX_ESCAPE_CHARS = 12   # the longest JSON escape a prefix can cut: a surrogate pair, \uXXXX\uXXXX


class StepStream:
    def __init__(self, tok, stop: list[str] = ()):
        self.tok, self.stop = tok, list(stop)
        self.pending: list[int] = []   # tokens whose bytes do not end a character yet
        self.text = ""                 # the decoded step, cut before a stop sequence
        self.stopped = False           # a stop sequence was written
        self.message = {"role": "assistant", "content": None}

    def push(self, token: int) -> list[dict]:
        """The deltas one new token makes certain (none while a character or a stop sequence is unfinished)."""
        self.pending.append(token)
        piece = self.tok.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < 4:
            return []   # the rest of a UTF-8 character (at most 4 bytes) is still to come
        self.pending = []
        self.text += piece
        return self._update(self.text[:self._released()], final=False)

    def end(self, complete: bool) -> tuple[list[dict], str]:
        """The last deltas and the finish_reason. complete: the step reached its end (`</s>`, or the grammar
        allows nothing else); False when max_tokens cut it."""
        if self.pending:   # cut inside a character: its bytes decode to U+FFFD
            self.text += self.tok.decode(self.pending)
            self.pending = []
            self._released()
        deltas = self._update(self.text, final=True)
        _, name, arguments = _parts(self.text, final=True)
        if self.stopped or not complete or arguments is None:
            return deltas, "stop" if self.stopped else "length"
        if name == FINISH:
            if self.message["content"] is None:   # Finish without a final_answer: the answer is ""
                self.message["content"] = ""
                deltas.append({"content": ""})
            return deltas, "stop"
        return deltas + self._call(name, arguments.strip()), "tool_calls"

    def _released(self) -> int:
        """How much of the text is final: all of it up to a stop sequence (which ends the completion), else
        all but a suffix that could become one."""
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
            return len(self.text)
        return len(self.text) - max((_partial(self.text, s) for s in self.stop), default=0)

    def _update(self, text: str, final: bool) -> list[dict]:
        thought, name, arguments = _parts(text, final)
        deltas = [self._extend("reasoning_content", thought)]
        if name == FINISH and arguments is not None:
            deltas.append(self._extend("content", _answer(arguments)))
        return [delta for delta in deltas if delta is not None]

    def _extend(self, field: str, value: str) -> dict | None:
        """The delta that grows message[field] to `value`, or None when it has nothing new."""
        sent = self.message.get(field) or ""
        if len(value) <= len(sent):
            return None
        if not value.startswith(sent):   # deltas only append: a sent character can never change
            raise RuntimeError(f"{field} would change what was sent: {sent[-40:]!r} -> {value[-40:]!r}")
        self.message[field] = value
        return {field: value[len(sent):]}

    def _call(self, name: str, arguments: str) -> list[dict]:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.message["tool_calls"] = [{"id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": arguments}}]
        head = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return [{"tool_calls": [head]}] + [
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + ARGUMENT_FRAGMENT_CHARS]}}]}
            for i in range(0, len(arguments), ARGUMENT_FRAGMENT_CHARS)]


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


def _parts(text: str, final: bool) -> tuple[str, str | None, str | None]:
    """(thought, action name or None, arguments text or None) of a step's text so far. Not final: the
    thought leaves out an end that could be the start of "\\nAction: "."""
    body = "" if THOUGHT.startswith(text) else text.removeprefix(THOUGHT)
    thought, found, rest = body.partition(ACTION)   # the grammar ends the thought at its first "\nAction: "
    if not found:
        return (thought if final else thought[:len(thought) - _partial(thought, ACTION)]), None, None
    name, found, arguments = rest.partition(INPUT)
    return (thought, name, arguments) if found else (thought, None, None)


def _answer(arguments: str) -> str:
    """Finish's final_answer as far as its JSON string is written (an escape is decoded once whole)."""
    key = _ANSWER_KEY.search(arguments)
    if key is None:
        return ""
    body = arguments[key.end() - 1:]   # from the string's opening quote
    try:
        return json.decoder.scanstring(body, 1, False)[0]
    except json.JSONDecodeError:
        pass   # not closed yet: the longest beginning that decodes, closed by us
    for end in range(len(body), max(len(body) - _MAX_ESCAPE_CHARS, 1) - 1, -1):
        try:
            value = json.decoder.scanstring(body[:end] + '"', 1, False)[0]
        except json.JSONDecodeError:
            continue
        # Half a surrogate pair waits for its other half (alone it cannot be sent as UTF-8).
        return value[:-1] if value and "\ud800" <= value[-1] <= "\udbff" else value
    return ""
