"""slm.serve driven by the real openai client: tiny untrained models with OPT's tokenizer, each served by a
subprocess on 127.0.0.1 on a free port (stopped by its pid).

Two servers: `server` (a random model, --max-batch 16) answers the protocol's fields and errors; `nan_server`
serves the same model with NaN weights, as a diverged run leaves them, at --max-batch 2 --max-queue 2. Its
greedy steps are long and always the same (every logit is NaN, so the argmax is the first token the grammar
allows), which holds a batch busy for the queue and disconnect tests, and sampling from it fails inside the
server, a real internal error. Run: pytest tests/test_serve.py
"""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState

import slm
from slm import step_grammar
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
CONFIG = dict(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
              max_position_embeddings=2048, word_embed_proj_dim=32)


def http(method: str, url: str, body: bytes | None = None, key: str = KEY) -> tuple[int, dict]:
    """A raw request (what the openai client cannot send): the status and the JSON body."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def save_tiny(directory: Path, nan: bool = False) -> Path:
    torch.manual_seed(0)
    model = slm.OPT(slm.OPTConfig(**CONFIG)).eval()
    if nan:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    slm.save_model(model, directory, tokenizer=slm.load_tokenizer(shared_path("opt")))
    return directory


@contextlib.contextmanager
def serving(directory: Path, name: str, *flags: str):
    """The server's base URL while it runs; SIGTERM by pid afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # One torch thread: on a machine whose cores are shared, an idle second intra-op thread that must be
    # scheduled for every op made each token ~40x slower; the tiny model gains nothing from it.
    process = subprocess.Popen([sys.executable, "-m", "slm.serve", "--model", str(directory), "--name", name,
                                "--port", str(port), "--api-key", KEY, *flags], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                http("GET", f"{base}/health")
                break
            except OSError:
                assert process.poll() is None, "the server exited while starting"
                time.sleep(0.1)
        yield base
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint):
    with serving(checkpoint, "tiny", "--max-batch", "16") as base:
        yield base


@pytest.fixture(scope="module")
def nan_server(tmp_path_factory):
    directory = save_tiny(tmp_path_factory.mktemp("served") / "diverged", nan=True)
    with serving(directory, "diverged", "--max-batch", "2", "--max-queue", "2") as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def nan_client(nan_server):
    return openai.OpenAI(base_url=f"{nan_server}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, **kwargs):
    return client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 64, **kwargs})


def status(base: str) -> dict:
    return http("GET", f"{base}/health")[1]


def until(condition, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.01)


def essentials(completion) -> dict:
    """What an answer says (a tool call's random id left out), for comparing two answers."""
    choice = completion.choices[0]
    message = choice.message
    calls = [(c.type, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return {"content": message.content, "reasoning_content": getattr(message, "reasoning_content", None),
            "tool_calls": calls, "finish_reason": choice.finish_reason}


# --------------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_give_a_schema_valid_call(client, tool_choice):
    answer = ask(client, tools=[WEATHER], tool_choice=tool_choice, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.reasoning_content
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_none_answers_in_content_with_the_thought_as_reasoning(client):
    answer = ask(client, tools=[WEATHER], tool_choice="none", temperature=0)
    message = answer.choices[0].message
    assert message.tool_calls is None and isinstance(message.content, str) and message.reasoning_content
    assert answer.choices[0].finish_reason == "stop"


def greedy_step(checkpoint, max_tokens: int) -> str:
    """The step slm.generate writes for MESSAGES under the server's grammar for tool_choice "required" and
    `max_tokens` (thought max_tokens // 4 chars, values at least 24), `</s>` written out."""
    tok = slm.load_tokenizer(checkpoint)
    matcher = step_grammar.for_tokenizer(tok).matcher([WEATHER["function"]], "required", thought_chars=max_tokens // 4,
                                                      value_chars=max(24, max_tokens // 4))
    prompt = tok.encode(slm.chat.render(MESSAGES, [WEATHER]))
    return tok.decode(slm.generate(slm.load_model(checkpoint), [prompt], max_tokens, constraints=[matcher])[0])


def test_temperature_0_answer_is_slm_generates_tokens(client, checkpoint):
    step = greedy_step(checkpoint, 64)
    assert step.endswith("</s>")
    head, _, arguments = step.removesuffix("</s>").partition("\nAction Input: ")
    message = ask(client, tools=[WEATHER], tool_choice="required", temperature=0).choices[0].message
    call = message.tool_calls[0].function
    assert head == f"\nThought: {message.reasoning_content}\nAction: {call.name}"
    assert call.arguments == arguments.strip()   # the JSON as the model wrote it


def test_length_never_returns_a_cut_call(client, checkpoint):
    step = greedy_step(checkpoint, 20)
    assert "\nAction Input: {" in step and not step.endswith("</s>")   # cut inside the arguments
    answer = ask(client, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=20)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 20
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content is None
    assert step.startswith(f"\nThought: {answer.choices[0].message.reasoning_content}\nAction: ")


def test_an_answer_sent_back_continues_the_conversation(client):
    """The agent loop: the SDK's message object goes back as it is, the tool's result answers its call."""
    message = ask(client, tools=[WEATHER], tool_choice="required", temperature=0).choices[0].message
    messages = [*MESSAGES, message.model_dump(), {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                                                  "content": '{"sky": "sunny"}'}]
    assert ask(client, messages=messages, tools=[WEATHER], tool_choice="none").choices[0].finish_reason == "stop"


def test_temperature_0_is_the_same_in_a_batch(client):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: ask(client, tools=[WEATHER], tool_choice="required", temperature=0),
                                range(16)))
    assert len({json.dumps(essentials(a)) for a in answers}) == 1


# --------------------------------------------------------------------------------------------------
# Streaming


def streamed(client, **kwargs):
    """The chunks of a streamed request and the answer that openai's own accumulator builds from them."""
    state = ChatCompletionStreamState()
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks:
        state.handle_chunk(chunk)
    return chunks, state.current_completion_snapshot


@pytest.mark.parametrize("kwargs", [
    dict(tools=[WEATHER], tool_choice="required"),                # a call
    dict(tools=[WEATHER], tool_choice="none"),                    # Finish: content
    dict(tools=[WEATHER], tool_choice="required", max_tokens=20), # cut by the length
    dict(tools=[WEATHER], tool_choice="none", stop=["ends"]),     # cut by a stop sequence (see test_stop)
], ids=["call", "finish", "length", "stop"])
def test_streaming_reassembles_into_the_answer(client, kwargs):
    whole = ask(client, temperature=0, **kwargs)
    chunks, snapshot = streamed(client, temperature=0, **kwargs)
    assert essentials(snapshot) == essentials(whole)
    assert snapshot.usage == whole.usage == chunks[-1].usage and chunks[-1].choices == []
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    names = [d.function.name for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []
             if d.function and d.function.name]
    assert names == [c.function.name for c in whole.choices[0].message.tool_calls or []]   # once, whole
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done(server):
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "stream": True}).encode()
    request = urllib.request.Request(f"{server}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant"}


# --------------------------------------------------------------------------------------------------
# Sampling and stop sequences


def first_written_in(text: str, before: str, start: int) -> tuple[int, str]:
    """A 4-character piece of `text` (from `start` on, plain characters that JSON writes as they are) that
    the step does not write before it: (where, piece)."""
    return next((k, text[k:k + 4]) for k in range(start, len(text) - 3)
                if text[k:k + 4].replace(" ", "").isalnum() and text[k:k + 4] not in before + text[:k + 3])


def test_stop_ends_the_completion_before_the_stop_text(client):
    whole = ask(client, tools=[WEATHER], tool_choice="none", temperature=0).choices[0].message
    thought, answer = whole.reasoning_content, whole.content
    k, in_thought = first_written_in(thought, "\nThought: ", 1)
    cut = ask(client, tools=[WEATHER], tool_choice="none", temperature=0, stop=["never written", in_thought])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.reasoning_content == thought[:k] and cut.choices[0].message.content is None
    written_before_answer = f"{thought} Action: Finish Action Input: return_type give_answer final_answer"
    k, in_answer = first_written_in(answer, written_before_answer, 1)
    cut = ask(client, tools=[WEATHER], tool_choice="none", temperature=0, stop=in_answer)
    assert (cut.choices[0].finish_reason, cut.choices[0].message.content) == ("stop", answer[:k])
    called = ask(client, tools=[WEATHER], tool_choice="required", temperature=0, stop="}")
    assert called.choices[0].finish_reason == "stop" and not called.choices[0].message.tool_calls


def test_seed_gives_the_same_tokens_alone_and_batched(client):
    seeded = dict(tools=[WEATHER], tool_choice="auto", temperature=1.0, seed=1234)
    alone = essentials(ask(client, **seeded))
    requests = [seeded] * 4 + [dict(seeded, seed=None)] * 4 + [dict(seeded, seed=99)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = [essentials(a) for a in pool.map(lambda kwargs: ask(client, **kwargs), requests)]
    assert answers[:4] == [alone] * 4
    assert answers[-1] != alone and alone != essentials(ask(client, tools=[WEATHER], temperature=0))


def test_top_p_near_0_is_greedy(client):
    greedy = essentials(ask(client, tools=[WEATHER], temperature=0))
    assert essentials(ask(client, tools=[WEATHER], temperature=1.5, top_p=1e-9, seed=5)) == greedy
    assert essentials(ask(client, tools=[WEATHER], temperature=1.5, top_p=1.0, seed=5)) != greedy


# --------------------------------------------------------------------------------------------------
# Errors

ANSWERED_CALL = [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]


def tool(name="get_weather", parameters=None):
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


@pytest.mark.parametrize("kwargs, status, code, param", [
    (dict(model="other"), 404, "model_not_found", "model"),
    (dict(messages=[]), 400, "invalid_value", "messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value", "messages[0].role"),
    (dict(messages=ANSWERED_CALL, tools=[WEATHER]), 400, "invalid_value", "messages[2]"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "unsupported_value", "messages[0].content"),
    (dict(tool_choice="required"), 400, "invalid_value", "tool_choice"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "invalid_value",
     "tool_choice"),
    (dict(tools=[tool("Finish")]), 400, "invalid_value", "tools[0].function.name"),
    (dict(tools=[tool("get weather")]), 400, "invalid_value", "tools[0].function.name"),
    (dict(tools=[WEATHER, WEATHER]), 400, "invalid_value", "tools[1].function.name"),
    (dict(tools=[tool(parameters={"type": "array"})]), 400, "invalid_value", "tools[0].function.parameters"),
    (dict(tools=[WEATHER, tool("f", {"type": "object", "properties": {"a": {"type": "strin"}}})]), 400,
     "invalid_value", "tools[1].function.parameters"),
    (dict(max_tokens=0), 400, "invalid_value", "max_tokens"),
    (dict(max_tokens=2000), 400, "context_length_exceeded", "messages"),
    (dict(temperature=3), 400, "invalid_value", "temperature"),
    (dict(top_p=1.5), 400, "invalid_value", "top_p"),
    (dict(seed="7"), 400, "invalid_value", "seed"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop"),
    (dict(stop=""), 400, "invalid_value", "stop"),
    (dict(stream_options={"include_usage": True}), 400, "invalid_value", "stream_options"),
    (dict(n=2), 400, "unsupported_value", "n"),
    (dict(logprobs=True), 400, "unsupported_value", "logprobs"),
    (dict(logit_bias={"50": 1}), 400, "unsupported_value", "logit_bias"),
    (dict(presence_penalty=0.5), 400, "unsupported_value", "presence_penalty"),
    (dict(response_format={"type": "json_object"}), 400, "unsupported_value", "response_format"),
    (dict(functions=[WEATHER["function"]]), 400, "unsupported_value", "functions"),
    (dict(extra_body={"frobnicate": 1}), 400, "unsupported_parameter", "frobnicate"),
])
def test_client_mistakes_are_4xx_and_the_server_still_answers(client, kwargs, status, code, param):
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, **kwargs)
    assert caught.value.status_code == status
    assert (caught.value.body["code"], caught.value.body["param"]) == (code, param)
    assert ask(client, max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_accepted_fields_at_their_neutral_values(client):
    """Fields at their neutral values, and text given as content parts, change nothing in the answer."""
    plain = ask(client, temperature=0, tools=[WEATHER],
                messages=[{"role": "developer", "content": "Be brief."}, *MESSAGES])
    neutral = ask(client, n=1, logprobs=False, presence_penalty=0, frequency_penalty=0, user="u", temperature=0,
                  response_format={"type": "text"}, parallel_tool_calls=True, tools=[WEATHER],
                  messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *MESSAGES])
    assert essentials(neutral) == essentials(plain)


def test_auth_body_routes_and_health(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert http("POST", f"{server}/v1/chat/completions", b"{not json")[0] == 400
    status_code, body = http("POST", f"{server}/v1/chat/completions", b"x" * (2 << 20))
    assert status_code == 413 and body["error"]["code"] == "request_too_large"
    assert http("GET", f"{server}/nowhere")[0] == 404
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert http("GET", f"{server}/health", key="") == (200, {"status": "ok", "queued": 0, "decoding": 0})


# --------------------------------------------------------------------------------------------------
# Server failures, a full queue, clients that leave (the NaN model: long, fixed greedy steps)


def open_stream(nan_client):
    """A streamed request for a long step (~700 tokens); returns once the server answered with headers."""
    return nan_client.chat.completions.create(model="diverged", messages=MESSAGES, tools=[WEATHER],
                                              tool_choice="required", temperature=0, stream=True)


def decoding_stream(nan_client):
    """A long stream that is decoding: its role chunk and its first reasoning chunk came."""
    stream = open_stream(nan_client)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    return stream, next(chunks)


def test_a_server_failure_is_a_500_without_traceback(nan_server, nan_client):
    status_code, body = http("POST", f"{nan_server}/v1/chat/completions", json.dumps(
        {"model": "diverged", "messages": MESSAGES, "temperature": 1, "max_tokens": 8}).encode())
    assert status_code == 500 and body["error"]["code"] == "internal_error"
    assert "Traceback" not in json.dumps(body) and "multinomial" not in json.dumps(body)
    with pytest.raises(openai.APIError, match="failed to decode"):   # in a stream: an error event
        list(nan_client.chat.completions.create(model="diverged", messages=MESSAGES, temperature=1, max_tokens=8,
                                                stream=True))
    assert nan_client.chat.completions.create(model="diverged", messages=MESSAGES, temperature=0,
                                              max_tokens=8).choices[0].finish_reason == "length"


def test_a_full_queue_is_429_with_retry_after(nan_server, nan_client):
    first, _ = decoding_stream(nan_client)
    waiting = [open_stream(nan_client) for _ in range(2)]
    until(lambda: status(nan_server) == {"status": "ok", "queued": 2, "decoding": 1})
    with pytest.raises(openai.RateLimitError) as caught:
        nan_client.chat.completions.create(model="diverged", messages=MESSAGES, temperature=0, max_tokens=4)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "rate_limit_exceeded"
    for stream in [first, *waiting]:   # clients that leave while decoding or queued: nothing is left to do
        stream.close()
    until(lambda: status(nan_server) == {"status": "ok", "queued": 0, "decoding": 0})


@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_leaves_is_dropped_from_its_batch(nan_server, nan_client, streaming):
    blocker, _ = decoding_stream(nan_client)
    if streaming:
        leaving = open_stream(nan_client)
    else:   # a plain request on a connection of its own, closed before the answer
        leaving = HTTPConnection("127.0.0.1", int(nan_server.rsplit(":", 1)[1]), timeout=60)
        leaving.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "diverged", "messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required",
             "temperature": 0}), {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        staying = pool.submit(lambda: nan_client.chat.completions.create(
            model="diverged", messages=MESSAGES, tools=[WEATHER], tool_choice="required", temperature=0))
        until(lambda: status(nan_server)["queued"] == 2)
        blocker.close()                 # its row stops, and the two waiting requests decode as one batch
        if streaming:
            chunks = iter(leaving)
            assert next(chunks).choices[0].delta.role == "assistant"
            assert next(chunks).choices[0].delta.reasoning_content   # streamed live, while both rows decode
        until(lambda: status(nan_server)["decoding"] == 2)
        leaving.close()
        # The two rows are the same step, so they would end together: one row left means one was dropped.
        until(lambda: status(nan_server)["decoding"] == 1)
        assert staying.result().choices[0].finish_reason == "tool_calls"
    assert status(nan_server) == {"status": "ok", "queued": 0, "decoding": 0}
