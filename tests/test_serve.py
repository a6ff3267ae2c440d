"""slm.serve driven by the real openai client: a tiny untrained model with OPT's tokenizer, served by a
subprocess on 127.0.0.1 (stopped by pid)."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

import slm
from slm import chat, step_grammar
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def http(method: str, url: str, body: bytes | None = None, key: str = KEY) -> tuple[int, dict]:
    """A raw request (what the openai client cannot send): the status and the JSON body."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = slm.load_tokenizer(shared_path("opt"))
    torch.manual_seed(0)
    config = slm.OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           ffn_dim=64, max_position_embeddings=2048, word_embed_proj_dim=32)
    directory = tmp_path_factory.mktemp("served") / "tiny"
    slm.save_model(slm.OPT(config).eval(), directory, tokenizer=tok)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint):
    directory = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "slm.serve", "--model", str(directory), "--name", "tiny",
                                "--port", str(port), "--api-key", KEY, "--max-batch", "16"], cwd=REPO)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                http("GET", f"{base}/models")
                break
            except OSError:
                assert process.poll() is None, "the server exited while starting"
                time.sleep(0.1)
        yield base
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def ask(client, **kwargs):
    return client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 64, **kwargs})


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_give_a_schema_valid_call(client, tool_choice):
    answer = ask(client, tools=[WEATHER], tool_choice=tool_choice, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0


def test_none_answers_in_content(client):
    answer = ask(client, tools=[WEATHER], tool_choice="none", temperature=0)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_length_never_returns_a_cut_call(client):
    answer = ask(client, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert not answer.choices[0].message.tool_calls


def test_streaming_reassembles_into_the_answer(client):
    whole = ask(client, tools=[WEATHER], tool_choice="required", temperature=0)
    chunks = list(ask(client, tools=[WEATHER], tool_choice="required", temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    names = [d.function.name for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])
             if d.function and d.function.name]
    assert names == ["get_weather"]
    arguments = "".join(d.function.arguments or "" for c in chunks if c.choices
                        for d in (c.choices[0].delta.tool_calls or []))
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(model="other"), 404, "model_not_found"),
    (dict(messages=[]), 400, "invalid_value"),
    (dict(tool_choice="required"), 400, "invalid_value"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "invalid_value"),
    (dict(max_tokens=0), 400, "invalid_value"),
    (dict(temperature=3), 400, "invalid_value"),
    (dict(n=2), 400, "invalid_value"),
    (dict(extra_body={"frobnicate": 1}), 400, "unsupported_parameter"),
])
def test_client_mistakes_are_4xx_and_the_server_still_answers(client, kwargs, status, code):
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, **kwargs)
    assert caught.value.status_code == status
    assert caught.value.body["code"] == code
    assert ask(client, max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_bad_key_body_and_route(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    assert http("POST", f"{server}/chat/completions", b"{not json")[0] == 400
    status, body = http("POST", f"{server}/chat/completions", b"x" * (2 << 20))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert http("GET", f"{server}/nowhere")[0] == 404
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_temperature_0_is_slm_generate(client, server):
    # The served tokens at temperature 0 equal a sixteen-request batch's: batching changes nothing.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: ask(client, tools=[WEATHER], tool_choice="required", temperature=0),
                                range(16)))
    calls = {a.choices[0].message.tool_calls[0].function.arguments for a in answers}
    assert len(calls) == 1


def test_temperature_0_answer_is_slm_generates_tokens(client, checkpoint):
    tok = slm.load_tokenizer(checkpoint)
    model = slm.load_model(checkpoint)
    # The server's grammar for max_tokens=64: thought 64 // 4 chars, values at least 24.
    matcher = step_grammar.for_tokenizer(tok).matcher([WEATHER["function"]], "required", thought_chars=16,
                                                      value_chars=24)
    prompt = tok.encode(chat.render(MESSAGES, [WEATHER]))
    row = slm.generate(model, [prompt], 64, constraints=[matcher])[0]
    expected = chat.parse(tok.decode(row[:-1] if row[-1] == 2 else row), [WEATHER])
    answer = ask(client, tools=[WEATHER], tool_choice="required", temperature=0)
    assert answer.choices[0].message.tool_calls[0].function.arguments == expected["tool_calls"][0]["function"]["arguments"]
