"""Chat-completion requests checked field by field, answers and errors in the shapes of the `openai` package's types.

    settings = validate(body, "slm")          # or APIError(status, message, param=..., code=...)
    completion(settings, message, "tool_calls", usage)   # a ChatCompletion
    chunk(head, {"content": "Hi"})                       # a ChatCompletionChunk

A null field counts as absent (OpenAI's optional fields are nullable). Fields this server cannot honour are
accepted at their neutral value (n 1, logprobs false, penalties 0, ...) and otherwise 400 `unsupported_value`;
a field OpenAI does not define is 400 `unsupported_parameter`.
"""

import json
import re
import time
import uuid

HONOURED = {"model", "messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "stop", "temperature",
            "top_p", "seed", "stream", "stream_options", "parallel_tool_calls", "user"}
# OpenAI's fields with no meaning here, each with the value that asks for nothing.
NEUTRAL = {"n": 1, "logprobs": False, "top_logprobs": 0, "logit_bias": {}, "frequency_penalty": 0,
           "presence_penalty": 0, "response_format": {"type": "text"}}
DEPRECATED = {"functions": "tools", "function_call": "tool_choice"}
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RESERVED_TOOL = "Finish"   # the format's own function, which ends a step with the answer
MAX_STOP = 4
SEED_RANGE = (-2**63, 2**64 - 1)   # what torch.Generator.manual_seed takes


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(value, param: str, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{param} must be a number from {low} to {high}, got {value!r}", param)
    return float(value)


def _positive_int(value, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(f"{param} must be a positive integer, got {value!r}", param)
    return value


def validate(body, model_name: str) -> dict:
    """The request's settings, or an APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    body = {key: value for key, value in body.items() if value is not None}
    for key in sorted(body):
        if key in DEPRECATED:
            raise bad(f"{key} is deprecated and not supported: send {DEPRECATED[key]}", key, "unsupported_value")
        if key in NEUTRAL and body[key] != NEUTRAL[key]:
            raise bad(f"{key} {body[key]!r} is not supported: this server only accepts {NEUTRAL[key]!r}", key,
                      "unsupported_value")
        if key not in HONOURED and key not in NEUTRAL:
            raise bad(f"unknown or unsupported field {key!r}: this server honours {sorted(HONOURED)}", key,
                      "unsupported_parameter")
    if not isinstance(body.get("model"), str):
        raise bad("model is required: a model id string", "model", "missing_required_parameter")
    if body["model"] != model_name:
        raise APIError(404, f"the model {body['model']!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    tools = _tools(body.get("tools", []))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options must be an object {include_usage: boolean}", "stream_options")
    if options and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(body.get("parallel_tool_calls", True), bool):
        raise bad("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    max_tokens = None   # absent: what the context leaves (worker.submit)
    for key in ("max_tokens", "max_completion_tokens"):   # the newer name wins when both are given
        if key in body:
            max_tokens = _positive_int(body[key], key)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise bad(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed!r}", "seed")
    return {"model": model_name, "messages": _messages(body.get("messages")), "tools": tools,
            "tool_choice": _tool_choice(body.get("tool_choice", "auto" if tools else "none"), tools),
            "max_tokens": max_tokens, "stop": _stop(body.get("stop", [])),
            "temperature": _number(body.get("temperature", 1.0), "temperature", 0, 2),
            "top_p": _number(body.get("top_p", 1.0), "top_p", 0, 1), "seed": seed,
            "stream": stream, "include_usage": options.get("include_usage", False)}


def _messages(messages) -> list[dict]:
    """The messages with text parts joined into one string; slm.chat checks the conversation's order."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"{where} must be an object whose role is one of {list(ROLES)}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise bad(f"{where}.content: only text parts ({{type: text, text}}) are supported", f"{where}.content",
                          "unsupported_value")
            content = "".join(part["text"] for part in content)
        elif content is not None and not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        if content is None and not (message["role"] == "assistant" and message.get("tool_calls")):
            raise bad(f"{where}.content is required", f"{where}.content")
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and (not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments"), str)
                for c in calls)):
            raise bad(f"{where}.tool_calls must be a list of {{id, type: function, function: {{name, arguments}}}}",
                      f"{where}.tool_calls")
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id is required: the id of the call it answers", f"{where}.tool_call_id")
        out.append({**message, "content": content})
    return out


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise bad("tools must be a list of {type: function, function: {name, description, parameters}}", "tools")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad(f"{where} must be {{type: function, function: {{name, description, parameters}}}}", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise bad(f"{where}.function.name must match {TOOL_NAME.pattern}, got {name!r}", f"{where}.function.name")
        if name == RESERVED_TOOL or name in names:
            raise bad(f"{where}.function.name {name!r} is " + ("reserved: the format's Finish ends a step with the "
                      "answer" if name == RESERVED_TOOL else "offered twice"), f"{where}.function.name")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise bad(f"{where}.function.description must be a string", f"{where}.function.description")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise bad(f"{where}.function.parameters must be a JSON Schema object with type 'object' (the arguments "
                      "are an object)", f"{where}.function.parameters")
    return tools


def _tool_choice(choice, tools: list[dict]):
    names = [tool["function"]["name"] for tool in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise bad(f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice")
        return {"name": name}
    if choice not in ("auto", "required", "none"):
        raise bad("tool_choice must be 'auto', 'required', 'none' or {type: function, function: {name}}",
                  "tool_choice")
    if choice == "required" and not tools:
        raise bad("tool_choice 'required' needs at least one tool", "tool_choice")
    return choice


def _stop(stop) -> list[str]:
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stop


def completion(settings: dict, message: dict, finish_reason: str, usage: dict) -> dict:
    """A `ChatCompletion`."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": settings["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def chunk_head(settings: dict) -> dict:
    """The fields every `ChatCompletionChunk` of one answer shares."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": settings["model"]}


def chunk(head: dict, delta: dict, finish_reason: str | None = None) -> dict:
    return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(head: dict, usage: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {**head, "choices": [], "usage": usage}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
