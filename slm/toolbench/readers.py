"""Rows: their validation, and the readers of each file kind (ToolLLaMA array, DFS answer, ToolEval answers).

    for row in toolbench.read_rows(path):          # any kind, detected; `Malformed` items stand for bad elements
        toolbench.check_row(row)                   # raises BadRow(reason) for an unusable row
    queries = toolbench.read_queries(path)         # StableToolBench test queries

A row is `{"id": "Step N: <query>", "conversations": [{"from": role, "value": str}, ...]}` with roles
system, user, assistant, function.
"""

import ast
import json
import re
from pathlib import Path

from .json_array import JsonArrayReader, Malformed
from .parse import assistant_value
from .schemas import FINISH
from .template import EOS_TEXT, ROLES, add_functions_to_system, opening, system_prompt


class BadRow(ValueError):
    """A row that cannot become a training example; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_row(row) -> dict:
    """Raise `BadRow` (missing_field, unknown_role, empty_assistant, eos_in_assistant, no_assistant)
    unless `row` is usable."""
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise BadRow("missing_field", f"row without a 'conversations' list: {str(row)[:200]}")
    if not isinstance(row.get("id"), str):
        raise BadRow("missing_field", f"row without a string 'id': {str(row)[:200]}")
    for i, message in enumerate(row["conversations"]):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise BadRow("missing_field", f"{row['id'][:80]!r} message {i} lacks a string 'value'")
        if message.get("from") not in ROLES:
            raise BadRow("unknown_role", f"{row['id'][:80]!r} message {i} has role {message.get('from')!r}, "
                         f"expected one of {sorted(ROLES)}")
        if message["from"] == "assistant" and not message["value"].strip():
            raise BadRow("empty_assistant", f"{row['id'][:80]!r} message {i} is an empty assistant turn")
        if message["from"] == "assistant" and EOS_TEXT in message["value"]:
            # it would tokenize to the stop token inside a target and teach the model to stop mid-step
            raise BadRow("eos_in_assistant", f"{row['id'][:80]!r} message {i} contains {EOS_TEXT!r}")
    if not row["conversations"] or row["conversations"][-1]["from"] != "assistant":
        raise BadRow("no_assistant", f"{row['id'][:80]!r} does not end with an assistant turn")
    return row


def query_of(row: dict) -> str:
    """The query a row belongs to: its id without the "Step N: " prefix."""
    prefix, sep, query = row["id"].partition(": ")
    return query if sep and prefix.startswith("Step ") else row["id"]



def dfs_rows(answer: dict, source: str = "") -> list[dict]:
    """ToolLLaMA rows from a ToolBench DFS (or CoT) answer file, as ToolBench's preprocessing makes them.

    Each `train_messages` entry becomes one row ending at its last assistant message, which must be a
    function call (entries ending in plain text are skipped). Thoughts written as separate assistant
    messages are folded into the next call ("\\nThought: {text}"); the content of a message that
    carries a function call is not kept, and a thought not followed by a call before the next
    non-assistant message is lost — all as ToolBench did. The id is "Step {k}: {query}", k being the
    index of the last message. Invalid answers (`valid_data` false) give no rows.
    """
    generation = answer["answer_generation"]
    if not generation.get("valid_data"):
        return []
    query, functions = generation["query"], generation["function"]
    rows = []
    for messages in generation["train_messages"]:
        if messages[-1]["role"] != "assistant" or "function_call" not in messages[-1]:
            continue
        conversations, thought = [], None
        for message in messages:
            role = message["role"]
            if role != "assistant":
                value = message["content"]
                if role == "system":
                    value = add_functions_to_system(value, functions)
                conversations.append({"from": role, "value": value})
                thought = None
            elif "function_call" not in message:
                thought = (thought or "") + f"\nThought: {message['content']}"
            else:
                call = message["function_call"]
                react = thought if thought is not None else "\nThought: "
                conversations.append({"from": "assistant", "value": f"{react}\nAction: {call['name']}"
                                      f"\nAction Input: {call['arguments']}"})
                thought = None
        row = {"id": f"Step {len(messages) - 1}: {query}", "conversations": conversations}
        if source:
            row["source"] = source
        rows.append(row)
    return rows


def _tool_of_function(function: dict) -> str:
    """The tool a ToolBench function schema belongs to (from its 'subfunction for tool "x"' sentence)."""
    match = re.match(r'This is the subfunction for tool "([^"]*)"', function.get("description", ""))
    return match.group(1) if match else function["name"].rpartition("_for_")[2]


_PY_STR = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_TOOL_CALL_HEAD = re.compile(r"\{'name': " + _PY_STR + r", 'arguments': " + _PY_STR + r"(?:, 'response': )?", re.S)


def _tool_call(message) -> dict:
    """A converted-answer tool node's {name, arguments, response}.

    The released reference files cut long messages mid-response, so when the whole repr does not parse,
    name and arguments are read from its head and the response is what is left of it.
    """
    if isinstance(message, dict):
        return message
    try:
        call = ast.literal_eval(message)
    except (ValueError, SyntaxError):
        head = _TOOL_CALL_HEAD.match(message)
        if head is None:
            raise ValueError(f"tool message is not a {{'name', 'arguments', ...}} literal: {message[:120]!r}")
        rest = message[head.end():]
        return {"name": ast.literal_eval(head.group(1)), "arguments": ast.literal_eval(head.group(2)),
                "response": rest[1:] if rest[:1] in "'\"" else rest}
    if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
        raise ValueError(f"tool message lacks name/arguments: {message[:120]!r}")
    return call


def tooleval_rows(answers: dict, tools: dict[str, Path] | None = None):
    """ToolLLaMA rows from ToolEval converted answers (`{query_id: {query, available_tools, answer}}`).

    The first chain of each `answer_details` tree is read: an assistant node's message is the thought of
    the next tool call, a tool node (a Python-repr dict {name, arguments, response}) is one assistant
    call plus its observation (none after Finish). One row per call, step-exploded like ToolBench.
    Tool descriptions come from `tools` (a `tool_index`) when given, else are "None". A tool node that
    does not parse ends its query's chain with a `Malformed` item.
    """
    for query_id, item in answers.items():
        functions = item["available_tools"]
        names = [_tool_of_function(f) for f in functions if f["name"] != FINISH]
        described = []
        for name in names:
            path = (tools or {}).get(name)
            described.append((name, json.loads(path.read_text())["tool_description"] if path else ""))
        conversations = opening(system_prompt(functions, described), item["query"])
        node = {"next": item["answer"]["answer_details"]}
        thought, step = "", 0
        while node["next"]:
            node = node["next"][0]
            if node["role"] == "assistant":
                thought = node["message"]
            elif node["role"] == "tool":
                try:
                    call = _tool_call(node["message"])
                except (ValueError, SyntaxError, TypeError, KeyError) as err:
                    yield Malformed(f"query {query_id}: tool node after step {step} is not a "
                                    f"{{name, arguments, response}} literal ({err})")
                    break
                conversations.append({"from": "assistant",
                                      "value": assistant_value(thought, call["name"], call["arguments"])})
                step += 1
                yield {"id": f"Step {step}: {item['query']}", "conversations": list(conversations),
                       "source": f"tooleval:{query_id}"}
                if call["name"] != FINISH:
                    conversations.append({"from": "function", "value": str(call.get("response", ""))})
                thought = ""


def detect_format(path) -> str:
    """"toolllama" (a JSON array of rows), "dfs" (one answer file) or "tooleval" (converted answers)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return "toolllama"
    if head.startswith("{"):
        return "dfs" if '"answer_generation"' in head or '"win"' in head[:200] else "tooleval"
    raise ValueError(f"{path}: not a ToolBench file (expected a JSON array or object), starts {head[:40]!r}")


def read_rows(path, fmt: str | None = None, tools: dict[str, Path] | None = None):
    """Rows of one input file of any kind; a `Malformed` item stands for an undecodable element."""
    fmt = fmt or detect_format(path)
    if fmt == "toolllama":
        yield from JsonArrayReader(path, is_element=lambda x: isinstance(x, dict) and "conversations" in x)
    elif fmt == "dfs":
        yield from dfs_rows(json.loads(Path(path).read_text(encoding="utf-8")), source=str(path))
    elif fmt == "tooleval":
        yield from tooleval_rows(json.loads(Path(path).read_text(encoding="utf-8")), tools)
    else:
        raise ValueError(f"unknown input format {fmt!r}: expected toolllama, dfs or tooleval")


def read_queries(path) -> list[dict]:
    """StableToolBench test queries: a JSON list of {query, query_id, api_list, relevant APIs}. Only the
    list is checked here: a malformed query is the caller's to name and skip."""
    queries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(queries, list):
        raise ValueError(f"{path}: expected a JSON list of queries, got {type(queries).__name__}")
    return queries
