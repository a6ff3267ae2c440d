"""One decode thread fed by a bounded queue: the waiting requests (up to --max-batch) decode as one batch.

`submit` (on the event loop) renders the conversation with `slm.chat.render` and builds the request's step
grammar (`slm.step_grammar`, for its tool_choice), so a conversation or a tool schema the server cannot use
is the client's 400, never a failed batch. The decode thread runs `slm.generate` on a batch; every token a
row keeps goes through the request's `StepStream` at once, and its deltas reach the request's event queue on
the loop (`call_soon_threadsafe`): a stream sends them while the batch decodes on. A row ends at `</s>`, at
its own max_tokens or at a stop sequence, and its request is answered then. A request whose client went
away (`Job.gone`) is skipped if still queued, and dropped from its batch by the `cancelled` callback that
slm.generate polls every step.

A job's events: ("delta", delta) (streamed requests only), then ("end", message, finish_reason, usage) or
("error", exception).
"""

import asyncio
import queue
import threading
from dataclasses import dataclass, field

import torch

from .. import chat, generate, step_grammar
from ..generate import Sampler
from ..tokenizer import EOS_ID
from .protocol import APIError, bad
from .stream import StepStream

MIN_VALUE_CHARS = 24


class QueueFull(Exception):
    """The queue holds --max-queue requests already."""


@dataclass
class Job:
    settings: dict
    prompt: list[int]
    matcher: step_grammar.StepMatcher
    sampler: Sampler | None
    stream: StepStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    gone: threading.Event = field(default_factory=threading.Event)   # the client disconnected
    tokens: int = 0
    ended: bool = False

    def send(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    def __init__(self, model, tok, max_batch: int, max_queue: int):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.context = model.config.max_position_embeddings
        self.grammar = step_grammar.for_tokenizer(tok)
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.decoding = 0   # the rows slm.generate still decodes (it polls `cancelled` once per step)
        threading.Thread(target=self._run, daemon=True, name="slm-decode").start()

    def status(self) -> dict:
        return {"queued": self.queue.qsize(), "decoding": self.decoding}

    def submit(self, settings: dict) -> Job:
        """Queue a validated request: APIError for a conversation or tools the model cannot take, QueueFull."""
        try:
            prompt = self.tok.encode(chat.render(settings["messages"], settings["tools"] or None))
        except ValueError as error:   # the format's rules (slm.chat), e.g. a tool message answering no call
            raise bad(str(error), str(error).split(":")[0]) from None
        room = self.context - len(prompt)
        max_tokens = settings["max_tokens"] or room   # not given: what the context leaves
        if room < 1 or max_tokens > room:
            asked = f" and max_tokens {max_tokens}" if settings["max_tokens"] else ""
            raise APIError(400, f"the conversation is {len(prompt)} tokens{asked}: over the model's context of "
                                f"{self.context} tokens", param="messages", code="context_length_exceeded")
        settings = {**settings, "max_tokens": max_tokens}
        sampler = None
        if settings["temperature"] > 0:
            generator = None if settings["seed"] is None else torch.Generator().manual_seed(settings["seed"])
            sampler = Sampler(settings["temperature"], settings["top_p"], generator)
        loop = asyncio.get_running_loop()
        job = Job(settings, prompt, self._matcher(settings), sampler, StepStream(self.tok, settings["stop"]), loop)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def _matcher(self, settings: dict) -> step_grammar.StepMatcher:
        """The request's step grammar, its thought and values bounded so a step fits max_tokens (any model,
        an untrained one too); a schema llguidance cannot compile is a 400 naming its tool."""
        budget = settings["max_tokens"]
        # Bounded so that a step fits max_tokens: the thought (one line) and each value, the values to at least
        # MIN_VALUE_CHARS, room for a name or a short answer even under a small budget (a step that then
        # overruns max_tokens ends with finish_reason "length", never as a call).
        bounds = {"thought_chars": min(budget // 4, step_grammar.MAX_THOUGHT_CHARS),
                  "value_chars": max(MIN_VALUE_CHARS, budget // 4)}
        functions = [tool["function"] for tool in settings["tools"]]
        for i, function in enumerate(functions):   # each alone, so the error names its tool
            try:
                self.grammar.matcher([function], {"name": function["name"]}, **bounds)
            except ValueError as error:
                raise bad(f"tools[{i}].function.parameters cannot be decoded under max_tokens {budget}: "
                          f"{str(error).splitlines()[0]}", f"tools[{i}].function.parameters") from None
        return self.grammar.matcher(functions, settings["tool_choice"], **bounds)

    def _run(self):
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            batch = [job for job in batch if not job.gone.is_set()]
            try:
                if batch:
                    self._decode(batch)
            except Exception as error:   # a bug: the batch's open requests get a 500; the thread lives on
                for job in batch:
                    if not job.ended:
                        job.ended = True
                        job.send("error", error)
            self.decoding = 0

    def _decode(self, batch: list[Job]):
        def on_token(i: int, token: int):
            job = batch[i]
            if job.matcher.failed:   # llguidance gave up on this grammar: a 500 for this request alone
                job.ended = True
                return job.send("error", RuntimeError(f"step grammar failed: {job.matcher.error}"))
            job.tokens += 1
            if token == EOS_ID:   # the grammar allows </s> only once the step is complete
                return self._end(job, complete=True)
            for delta in job.stream.push(token):
                if job.settings["stream"]:
                    job.send("delta", delta)
            if job.stream.stopped or job.tokens == job.settings["max_tokens"]:
                self._end(job, complete=job.matcher.done)

        def cancelled() -> set[int]:
            stop = {i for i, job in enumerate(batch) if job.ended or job.gone.is_set()}
            self.decoding = len(batch) - len(stop)
            return stop

        generate(self.model, [job.prompt for job in batch], max(job.settings["max_tokens"] for job in batch),
                 eos_id=EOS_ID, constraints=[job.matcher for job in batch], samplers=[job.sampler for job in batch],
                 on_token=on_token, cancelled=cancelled)
        if len(cancelled()) < len(batch):
            raise RuntimeError("slm.generate returned before every row of the batch ended")

    def _end(self, job: Job, complete: bool):
        deltas, finish_reason = job.stream.end(complete)
        job.ended = True
        if job.settings["stream"]:
            for delta in deltas:
                job.send("delta", delta)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": job.tokens,
                 "total_tokens": len(job.prompt) + job.tokens}
        job.send("end", job.stream.message, finish_reason, usage)
