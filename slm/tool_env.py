"""The tool environments the ReAct loop (slm/react.py) calls: recorded templates or StableToolBench's server.

    env = recorded_env(query)                      # a StableToolBench test query, offline
    env = server_env(query, "http://127.0.0.1:8080/virtual")   # its virtual API server
    result = env.call("transfermarkt_search_for_theclique", {"name": "messi"}, '{"name": "messi"}')
    result.observation   # '{"error": "", "response": "{\\"Clubs\\":[...]}"}', what the model reads next
    result.status        # "ok" | "undeclared" | "error"
    result.outcome       # "ok" | "undeclared" | "tool_error" | "server_error" | "timeout"

Offline (`recorded_env`), a declared function answers with what the query itself recorded about
it: its `template_response` (the response schema StableToolBench stored with every API, e.g.
{"name": "str", "_list_length": 10}), as `{"error": "", "response": <it as compact JSON text>}`.
The model therefore sees real response *shapes*, never real values: the environment can check *how*
a model calls tools (declared names, required arguments, relevant APIs), not whether its answer is
right.

Errors follow ToolBench's wording and shape (`toolbench/inference/Downstream_tasks/rapidapi.py`):
an undeclared function gets `{"error": "No such function name: <name>", "response": ""}`; a call
without a required argument, or with an argument the schema does not declare, gets an error
observation naming them. Every observation is cut to 1024 characters with "..." appended, as
ToolBench's `max_observation_length` does. `Finish` is not a tool: the ReAct loop handles it.

`server_env` sends every declared call to a StableToolBench virtual API server (a cache of real
responses, then an LLM simulator; `server/main.py` in StableToolBench) as its own client does
(`toolbench/inference/Downstream_tasks/rapidapi.py`, `_step`): `POST url` with the six fields
{category, tool_name, api_name, tool_input (the arguments as the model wrote them), strip,
toolbench_key}; the observation is `json.dumps` of the server's answer. When the server fails — no
answer within `timeout`, connection refused, an HTTP error, an answer that is not JSON — the call
gets an error observation saying why (status "error", outcome "server_error" or "timeout"), so the
episode goes on; a refused connection or a busy server (HTTP 429, 502-504) is retried first.

`ToolEnv` itself only knows the declared functions; what a declared call returns comes from a
`respond(name, arguments, text) -> observation` function, so other environments (the synthetic
tasks' executable tools) plug into the same loop.
"""

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from . import toolbench
from .toolbench import FINISH

MAX_OBSERVATION_CHARS = 1024   # ToolBench's max_observation_length (its runs used 1024)


OUTCOMES = ("ok", "undeclared", "tool_error", "server_error", "timeout")


@dataclass
class CallResult:
    observation: str   # the function message the model reads next (already truncated)
    status: str        # "ok", "undeclared" or "error" (the observation carries an error)
    error: str = ""    # the observation's error text, "" when status is "ok"
    outcome: str = ""  # one of OUTCOMES; "" means derived from status (an error is a tool error)

    def __post_init__(self):
        self.outcome = self.outcome or {"ok": "ok", "undeclared": "undeclared"}.get(self.status, "tool_error")


class ServiceError(Exception):
    """A tool server that did not answer usefully; `outcome` is "server_error" or "timeout"."""

    def __init__(self, outcome: str, reason: str):
        super().__init__(reason)
        self.outcome = outcome


def error_observation(message: str) -> str:
    return json.dumps({"error": message, "response": ""})


def truncate(observation: str) -> str:
    """ToolBench's observation cut: the first 1024 characters, then "..." when something was cut."""
    if len(observation) > MAX_OBSERVATION_CHARS:
        return observation[:MAX_OBSERVATION_CHARS] + "..."
    return observation


def _error_of(observation: str) -> str:
    """The `error` field of a JSON observation; text that is not such an object counts as no error."""
    try:
        value = json.loads(observation)
    except json.JSONDecodeError:
        return ""
    return str(value.get("error") or "") if isinstance(value, dict) else ""


def argument_problems(schema: dict, arguments: dict) -> list[str]:
    """Why `arguments` do not fit a function schema: missing required or undeclared parameters.

    Types are not checked: ToolBench passes arguments on as the model wrote them (an "integer"
    parameter given as "5" reaches the API unchanged), so a type mismatch is not a failed call there.
    """
    parameters = schema.get("parameters", {})
    declared = set(parameters.get("properties", {}))
    missing = [p for p in parameters.get("required", []) if p not in arguments]
    undeclared = sorted(set(arguments) - declared, key=str)
    problems = []
    if missing:
        problems.append(f"missing required parameters {missing}")
    if undeclared:
        problems.append(f"undeclared parameters {undeclared} (declared: {sorted(declared)})")
    return problems


class ToolEnv:
    """Declared functions + a responder: the name check, status and truncation shared by all suites."""

    def __init__(self, functions: list[dict], respond: Callable[[str, dict, str], str]):
        self.functions = {f["name"]: f for f in functions if f["name"] != FINISH}
        self.respond = respond

    def call(self, name: str, arguments: dict, text: str | None = None) -> CallResult:
        """Call `name` with `arguments`; `text` is them as the model wrote them (default: as JSON)."""
        # Exact names only: ToolBench's runner matched by suffix (`endswith`), which lets a truncated
        # or invented prefix through; here that call counts as a hallucinated function.
        if name not in self.functions:
            return CallResult(error_observation(f"No such function name: {name}"), "undeclared",
                              f"No such function name: {name}")
        outcome = ""
        try:
            observation = self.respond(name, arguments, json.dumps(arguments) if text is None else text)
        except ServiceError as err:
            observation, outcome = error_observation(str(err)), err.outcome
        except Exception as err:  # model-written arguments must never crash an evaluation run
            observation = error_observation(f"The function raised {type(err).__name__}: {err}")
        error = _error_of(observation)
        return CallResult(truncate(observation), "error" if error else "ok", error, outcome)


def recorded_env(query: dict) -> ToolEnv:
    """The environment of a StableToolBench query: each API answers with its recorded template_response."""
    functions = toolbench.functions_from_api_list(query["api_list"])
    schemas = {f["name"]: f for f in functions}
    responses = {}
    for function, api in zip(functions, query["api_list"]):
        template = api.get("template_response", "")
        responses[function["name"]] = (template if isinstance(template, str)
                                       else json.dumps(template, separators=(",", ":")))

    def respond(name: str, arguments: dict, text: str) -> str:
        problems = argument_problems(schemas[name], arguments)
        if problems:
            return error_observation(f"Invalid arguments for {name}: {'; '.join(problems)}")
        # json.dumps with its defaults, as ToolBench wrote observations (non-ASCII as \u escapes).
        return json.dumps({"error": "", "response": responses[name]})

    return ToolEnv(functions, respond)


# HTTP statuses that say "busy, try again" (a cache miss is a 500: asking again cannot help).
_TRANSIENT_STATUS = {429, 502, 503, 504}


def server_env(query: dict, url: str, key: str | None = None, timeout: float = 30.0,
               retries: int = 2, backoff: float = 0.5) -> ToolEnv:
    """The environment of a StableToolBench query served by its virtual API server at `url`.

    Names are sent as StableToolBench's client sends them: the API's category as written, the tool's
    standardized name (its tool file's stem) and the API's standardized name. `key` is the
    toolbench_key; it goes in the request only. A refused connection or a busy server is retried
    `retries` times, waiting `backoff`, then twice as long, and so on.
    """
    functions = toolbench.functions_from_api_list(query["api_list"])
    names = {f["name"]: {"category": api["category_name"], "tool_name": toolbench.standardize(api["tool_name"]),
                         "api_name": toolbench.change_name(toolbench.standardize(api["api_name"]))}
             for f, api in zip(functions, query["api_list"])}
    headers = {"Content-Type": "application/json", "toolbench_key": key or ""}

    def respond(name: str, arguments: dict, text: str) -> str:
        body = {**names[name], "tool_input": text, "strip": "truncate", "toolbench_key": key or ""}
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout) as reply:
                    answer = reply.read()
                break
            except urllib.error.HTTPError as err:
                failure = ServiceError("server_error", f"request invalid, data error. status_code={err.code}")
                transient = err.code in _TRANSIENT_STATUS
            except (OSError, http.client.HTTPException) as err:   # URLError is an OSError
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError):   # urllib wraps a connect timeout in URLError
                    raise ServiceError("timeout", f"Timeout error... no answer from the tool server "
                                                  f"within {timeout:g} s") from None
                failure = ServiceError("server_error", f"request invalid, the tool server at {url} "
                                                       f"cannot be reached ({reason})")
                transient = isinstance(reason, ConnectionError)
            if not transient or attempt == retries:
                raise failure
            time.sleep(backoff * 2 ** attempt)
        try:
            return json.dumps(json.loads(answer))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ServiceError("server_error", f"request invalid, data error: the tool server's answer is "
                                               f"not JSON: {answer[:80]!r}") from None

    return ToolEnv(functions, respond)
