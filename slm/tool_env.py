"""The offline tool environment the evaluator's ReAct loop calls instead of RapidAPI.

    env = recorded_env(query)                      # a StableToolBench test query
    result = env.call("transfermarkt_search_for_theclique", {"name": "messi"})
    result.observation   # '{"error": "", "response": "{\\"Clubs\\":[...]}"}', what the model reads next
    result.status        # "ok" | "undeclared" | "error"

No tool server and no network exist where we evaluate, so a declared function answers with what the
query itself recorded about it: its `template_response` (the response schema StableToolBench stored
with every API, e.g. {"name": "str", "_list_length": 10}), as `{"error": "", "response": <it as
compact JSON text>}`. The model therefore sees real response *shapes*, never real values: the
environment can check *how* a model calls tools (declared names, required arguments, relevant APIs),
not whether its answer is right.

Errors follow ToolBench's wording and shape (`toolbench/inference/Downstream_tasks/rapidapi.py`):
an undeclared function gets `{"error": "No such function name: <name>", "response": ""}`; a call
without a required argument, or with an argument the schema does not declare, gets an error
observation naming them. Every observation is cut to 1024 characters with "..." appended, as
ToolBench's `max_observation_length` does. `Finish` is not a tool: the ReAct loop handles it.

`ToolEnv` itself only knows the declared functions; what a declared call returns comes from a
`respond(name, arguments) -> observation` function, so other environments (the synthetic tasks'
executable tools) plug into the same loop.
"""

import json
from dataclasses import dataclass
from typing import Callable

from . import toolbench

MAX_OBSERVATION_CHARS = 1024   # ToolBench's max_observation_length (its runs used 1024)
FINISH = "Finish"


@dataclass
class CallResult:
    observation: str   # the function message the model reads next (already truncated)
    status: str        # "ok", "undeclared" or "error" (the observation carries an error)
    error: str = ""    # the observation's error text, "" when status is "ok"


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

    def __init__(self, functions: list[dict], respond: Callable[[str, dict], str]):
        self.functions = {f["name"]: f for f in functions if f["name"] != FINISH}
        self.respond = respond

    def call(self, name: str, arguments: dict) -> CallResult:
        # Exact names only: ToolBench's runner matched by suffix (`endswith`), which lets a truncated
        # or invented prefix through; here that call counts as a hallucinated function.
        if name not in self.functions:
            return CallResult(error_observation(f"No such function name: {name}"), "undeclared",
                              f"No such function name: {name}")
        try:
            observation = self.respond(name, arguments)
        except Exception as err:  # model-written arguments must never crash an evaluation run
            observation = error_observation(f"The function raised {type(err).__name__}: {err}")
        error = _error_of(observation)
        return CallResult(truncate(observation), "error" if error else "ok", error)


def recorded_env(query: dict) -> ToolEnv:
    """The environment of a StableToolBench query: each API answers with its recorded template_response."""
    functions = toolbench.functions_from_api_list(query["api_list"])
    schemas = {f["name"]: f for f in functions}
    responses = {}
    for function, api in zip(functions, query["api_list"]):
        template = api.get("template_response", "")
        responses[function["name"]] = (template if isinstance(template, str)
                                       else json.dumps(template, separators=(",", ":")))

    def respond(name: str, arguments: dict) -> str:
        problems = argument_problems(schemas[name], arguments)
        if problems:
            return error_observation(f"Invalid arguments for {name}: {'; '.join(problems)}")
        # json.dumps with its defaults, as ToolBench wrote observations (non-ASCII as \u escapes).
        return json.dumps({"error": "", "response": responses[name]})

    return ToolEnv(functions, respond)
