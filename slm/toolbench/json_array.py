"""A JSON array file read one element at a time (ToolBench's 2 GB training file does not fit a json.load).

    for element in JsonArrayReader(path): ...   # a `Malformed` item stands for an undecodable element
"""

import json
import re
from dataclasses import dataclass


@dataclass
class Malformed:
    """Stands in a row stream for an element that could not be decoded (it is counted, then skipped)."""

    where: str


_NEXT_ELEMENT = re.compile(r",\s*\{")  # where the next array element may start


class JsonArrayReader:
    """The elements of a JSON array file, one at a time, holding about one element in memory.

        for element in JsonArrayReader(path): ...

    Elements are decoded with `json.JSONDecoder.raw_decode` over a sliding text buffer. An element that
    does not decode is yielded as a `Malformed` item and the reader resynchronises at the next `,{`
    from which a complete element (`is_element`) decodes, so a bad element costs only itself. An
    element longer than `max_element_chars` counts as malformed.
    """

    def __init__(self, path, is_element=lambda x: isinstance(x, dict), chunk_chars: int = 1 << 20,
                 max_element_chars: int = 64 << 20):
        self.path, self.is_element = path, is_element
        self.chunk_chars, self.max_element_chars = chunk_chars, max_element_chars
        self.decoder = json.JSONDecoder()

    def __iter__(self):
        with open(self.path, encoding="utf-8") as self.file:
            self.buf, self.pos, self.eof = "", 0, False
            self._skip_space()
            if self.buf[self.pos:self.pos + 1] != "[":
                raise ValueError(f"{self.path}: expected a JSON array (first character '['), "
                                 f"got {self.buf[self.pos:self.pos + 20]!r}")
            self.pos += 1
            index = 0
            while True:
                self._skip_space()
                if self.pos >= len(self.buf):
                    yield Malformed(f"{self.path}: the file ends inside the array, after element {index}")
                    return
                if self.buf[self.pos] == "]":
                    return
                if self.buf[self.pos] == "," and index > 0:
                    self.pos += 1
                    self._skip_space()
                outcome = self._decode(self.pos)
                if isinstance(outcome, json.JSONDecodeError):
                    yield Malformed(f"{self.path}: element {index}: {outcome.msg}")
                    index += 1
                    if not self._resync():
                        return
                    continue
                element, self.pos = outcome
                index += 1
                yield element

    def _fill(self, at_least: int) -> bool:
        """Drop the consumed text, then read until `at_least` characters are buffered; False at EOF."""
        self.buf, self.pos = self.buf[self.pos:], 0
        grew = False
        while not self.eof and len(self.buf) < at_least:
            chunk = self.file.read(max(self.chunk_chars, at_least - len(self.buf)))
            self.eof = not chunk
            self.buf += chunk
            grew = grew or bool(chunk)
        return grew

    def _skip_space(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill(self.chunk_chars):
                return

    def _decode(self, start: int):
        """(element, end) decoded at `start`, reading on while the buffer ends inside it; else the error."""
        while True:
            if start > self.chunk_chars:
                self.pos = start
                self._fill(0)
                start = self.pos
            try:
                return self.decoder.raw_decode(self.buf, start)
            except json.JSONDecodeError as err:
                # A buffer that stops inside an element fails at its very end or in an unterminated string.
                truncated = err.pos >= len(self.buf) - 16 or err.msg.startswith("Unterminated string")
                size = len(self.buf) - start
                if not (truncated and size < self.max_element_chars):
                    return err
                self.pos = start
                if not self._fill(2 * size + self.chunk_chars):
                    return err
                start = self.pos

    def _resync(self) -> bool:
        """Move to the next `,{` after a malformed element where a whole element decodes."""
        search_from = self.pos + 1
        while True:
            match = _NEXT_ELEMENT.search(self.buf, search_from)
            if match is None:
                if self.eof:
                    return False
                self.pos = max(self.pos, len(self.buf) - 1)   # keep the last character: it may be ","
                search_from = 0
                self._fill(self.chunk_chars)
                continue
            candidate = match.end() - 1
            self.pos = candidate
            outcome = self._decode(candidate)
            if not isinstance(outcome, json.JSONDecodeError) and self.is_element(outcome[0]):
                return True
            search_from = self.pos + 1
