"""The levels of cutting that fit a prompt into max_len (default 2048) tokens, tried in order, and the
text of a message at each (encode.py's `fit_prompt` finds the first level that fits).

For each trained turn, the first of these levels at which its prompt plus its target fit is used
(later levels include the earlier ones; every function name and parameter name is always kept):

    0 original        the text as released
    1 short_schema    function descriptions without ToolBench's boilerplate, cut to 128 chars;
                      parameter descriptions cut to 64, string example values to 32
    2 obs_512         and observations (function messages) cut to 512 chars
    3 min_schema      and no function/parameter descriptions or example values; tool descriptions
                      in the tool list cut to 128 chars
    4 obs_128         and observations cut to 128 chars
    5 notes_256       and DFS retry notes (user turns after the query, which list the earlier
                      attempts) cut to 256 chars
    6 drop_turns      and the oldest history steps (an assistant turn with the messages after it)
                      are dropped, one at a time, until it fits

A target is never cut: a turn that does not fit even at level 6 is dropped (encode.py counts it).

    compact_system(system, LEVELS[3]), message_text(message, LEVELS[2])   # a text at a level
"""

import re
from dataclasses import dataclass
from functools import lru_cache

from .template import API_LIST_HEADER, split_system


@dataclass(frozen=True)
class Level:
    """One fitting step; None keeps a field as released, 0 removes it, n cuts it to n characters."""

    name: str
    function_description: int | None = None
    parameter_description: int | None = None
    example_value: int | None = None
    tool_description: int | None = None
    observation: int | None = None
    retry_note: int | None = None
    drop_turns: bool = False


LEVELS = (
    Level("original"),
    Level("short_schema", 128, 64, 32),
    Level("obs_512", 128, 64, 32, observation=512),
    Level("min_schema", 0, 0, 0, tool_description=128, observation=512),
    Level("obs_128", 0, 0, 0, tool_description=128, observation=128),
    Level("notes_256", 0, 0, 0, tool_description=128, observation=128, retry_note=256),
    Level("drop_turns", 0, 0, 0, tool_description=128, observation=128, retry_note=256, drop_turns=True),
)

_BOILERPLATE = re.compile(r'^This is the subfunction for tool "[^"]*", you can use this tool\.'
                          r'(The description of this function is: )?')
_TOOL_LIST_HEADER = "You have access of the following tools:\n"


# --------------------------------------------------------------------------------------------------
# Compacting the text of one message at a level


def _cut(value, limit: int | None):
    return value if limit is None or not isinstance(value, str) else value[:limit]


def _compact_function(function: dict, level: Level) -> dict:
    out = {"name": function["name"]}
    if level.function_description != 0 and "description" in function:
        out["description"] = _cut(_BOILERPLATE.sub("", function["description"]), level.function_description)
    parameters = function.get("parameters")
    if isinstance(parameters, dict):
        properties = {}
        for name, schema in (parameters.get("properties") or {}).items():
            compact = {key: value for key, value in schema.items() if key not in ("description", "example_value")}
            for key, limit in (("description", level.parameter_description), ("example_value", level.example_value)):
                if key in schema and limit != 0:
                    compact[key] = _cut(schema[key], limit)
            properties[name] = compact
        out["parameters"] = {**parameters, "properties": properties}
    return out


def _compact_tool_list(head: str, limit: int) -> str:
    before, sep, tools = head.partition(_TOOL_LIST_HEADER)
    if not sep:
        return head
    lines = [re.sub(r"^(\d+\.[^:]*: )(.*)$", lambda m: m.group(1) + m.group(2)[:limit], line)
             for line in tools.split("\n")]
    return before + sep + "\n".join(lines)


@lru_cache(maxsize=8)
def _split_system_once(system: str):
    """split_system, parsed once per system message (levels 1-5 all need it); None if not ToolBench's."""
    try:
        return split_system(system)
    except ValueError:
        return None


@lru_cache(maxsize=64)
def compact_system(system: str, level: Level) -> str:
    """The system message at `level`: schema details cut, every function and parameter name kept."""
    if level.function_description is None and level.tool_description is None:
        return system
    parsed = _split_system_once(system)
    if parsed is None:
        return system  # not ToolBench's layout: nothing we can shorten safely
    head, functions = parsed
    if level.tool_description is not None:
        head = _compact_tool_list(head, level.tool_description)
    return head + API_LIST_HEADER + str([_compact_function(f, level) for f in functions])


def message_text(message: dict, level: Level) -> str:
    if message["from"] == "system":
        return compact_system(message["value"], level)
    if message["from"] == "function":
        return _cut(message["value"], level.observation)
    if message["from"] == "user" and not message["value"].endswith("\nBegin!\n"):
        return _cut(message["value"], level.retry_note)  # a DFS retry note, not the query
    return message["value"]
