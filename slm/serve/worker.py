"""One decode thread fed by a bounded queue: waiting requests (up to --max-batch) decode as one batch.

A request's step is rendered with `slm.chat.render`, decoded under `slm.step_grammar` (the request's
tool_choice), and parsed back with `slm.chat.parse`. A request whose client went away is named by the
`cancelled` callback that `slm.generate` polls each step, so it stops decoding in the middle of a batch.
"""

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from .. import chat, generate, step_grammar
from ..toolbench.parse import ParseError
from .protocol import APIError

EOS_ID = 2   # OPT's </s>, which ends an assistant step
MIN_VALUE_CHARS = 24


class QueueFull(Exception):
    """The queue holds --queue requests already."""


@dataclass
class Job:
    request: dict
    prompt: list[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    disconnected: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(self, model, tok, max_batch: int, queue_size: int):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.grammar = step_grammar.for_tokenizer(tok)
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        threading.Thread(target=self._run, daemon=True, name="slm-decode").start()

    def submit(self, request: dict) -> Job:
        """Queue a validated request; raises QueueFull when the queue is full."""
        prompt = self.tok.encode(chat.render(request["messages"], request["tools"] or None))
        room = self.model.config.max_position_embeddings - len(prompt)
        if room < 1:
            raise APIError(400, f"the conversation is {len(prompt)} tokens; the model holds "
                                f"{self.model.config.max_position_embeddings}", param="messages",
                           code="context_length_exceeded")
        request["max_tokens"] = min(request["max_tokens"], room)
        loop = asyncio.get_running_loop()
        job = Job(request, prompt, loop.create_future(), loop)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def _run(self):
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            batch = [job for job in batch if not job.disconnected.is_set()]
            if not batch:
                continue
            try:
                results = self._decode(batch)
            except Exception as error:   # a bug: every request of the batch gets a 500, the thread lives on
                results = [error] * len(batch)
            for job, result in zip(batch, results):
                job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _decode(self, batch: list[Job]) -> list:
        matchers = []
        for job in batch:
            r = job.request
            functions = [tool["function"] for tool in r["tools"]]
            budget = r["max_tokens"]
            # Values bounded so a step fits the budget; never under Finish's longest enum value (19 chars),
            # which a smaller bound makes unsatisfiable.
            matchers.append(self.grammar.matcher(functions, r["tool_choice"], thought_chars=budget // 4,
                                                 value_chars=max(MIN_VALUE_CHARS, budget // 4)))
        tokens = generate(self.model, [job.prompt for job in batch], max(j.request["max_tokens"] for j in batch),
                          eos_id=EOS_ID,
                          constraints=matchers, temperatures=[j.request["temperature"] for j in batch],
                          cancelled=lambda: {i for i, j in enumerate(batch) if j.disconnected.is_set()})
        return [self._answer(job, row[:job.request["max_tokens"]]) for job, row in zip(batch, tokens)]

    def _answer(self, job: Job, row: list[int]):
        r = job.request
        ended = bool(row) and row[-1] == EOS_ID
        text = self.tok.decode(row[:-1] if ended else row)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(row),
                 "total_tokens": len(job.prompt) + len(row)}
        try:
            message = chat.parse(text, r["tools"] or None)
        except ParseError:
            # Cut by max_tokens (or an ungrammatical step): the text as content, never a cut call.
            message = {"role": "assistant", "content": text}
        finish = "tool_calls" if message.get("tool_calls") else "stop" if ended else "length"
        if finish == "length" and message.get("tool_calls"):
            message = {"role": "assistant", "content": text}
        return message, finish, usage


def _settle(future: asyncio.Future, result):
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
