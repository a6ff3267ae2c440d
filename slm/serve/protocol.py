"""Chat-completion requests checked field by field, answers and errors in OpenAI's shapes."""

import json
import time
import uuid

HONOURED = {"model", "messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "stream",
            "stream_options", "temperature", "n", "user", "parallel_tool_calls"}


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validate(body, model_name: str) -> dict:
    """The request's decoding settings, or an APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(body) - HONOURED)
    if unknown:
        raise _bad(f"unsupported field(s) {unknown}: this server honours {sorted(HONOURED)}", unknown[0],
                   "unsupported_parameter")
    if body.get("model") != model_name:
        raise APIError(404, f"the model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool") for m in messages):
        raise _bad("messages must be a non-empty list of {role: system|user|assistant|tool, ...} objects", "messages")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise _bad("tools must be a list of {type: function, function: {name, description, parameters}}", "tools")
    names = [t["function"]["name"] for t in tools]
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice")
        choice = {"name": name}
    elif choice not in ("auto", "required", "none"):
        raise _bad("tool_choice must be 'auto', 'required', 'none' or {type: function, function: {name}}",
                   "tool_choice")
    elif choice == "required" and not tools:
        raise _bad("tool_choice 'required' needs at least one tool", "tool_choice")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens must be a positive integer", "max_tokens")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise _bad("temperature must be a number from 0 to 2", "temperature")
    if body.get("n", 1) != 1:
        raise _bad("n must be 1: this server returns one choice", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return {"messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": max_tokens,
            "temperature": float(temperature), "stream": stream,
            "include_usage": bool(options.get("include_usage")), "model": model_name}


def completion(request: dict, message: dict, finish_reason: str, usage: dict) -> dict:
    """A `ChatCompletion` object."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": request["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def chunks(answer: dict, fragment_chars: int = 16):
    """The `ChatCompletionChunk` objects that reassemble into `answer`: role, content or the call's
    name once and its arguments in fragments, one finish_reason, usage last (when asked)."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"]}
    choice = answer["choices"][0]
    message = choice["message"]

    def chunk(delta, finish=None, **extra):
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}

    yield chunk({"role": "assistant", "content": ""})
    if message.get("reasoning_content"):
        yield chunk({"reasoning_content": message["reasoning_content"]})
    if message.get("content"):
        yield chunk({"content": message["content"]})
    for index, call in enumerate(message.get("tool_calls") or []):
        yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"], "arguments": ""}}]})
        args = call["function"]["arguments"]
        for start in range(0, len(args), fragment_chars):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": args[start:start + fragment_chars]}}]})
    yield chunk({}, choice["finish_reason"])
    if answer.get("_include_usage"):
        yield {**base, "choices": [], "usage": answer["usage"]}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
