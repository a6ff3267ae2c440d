"""The conversation template (ToolBench's `tool-llama-single-round`): roles, the system prompt, the opening.

    text = toolbench.render(row)                                  # ToolBench's training text
    conversations = toolbench.conversation_start(query, tools_dir)   # [system, user] for a test query
    conversations = toolbench.opening(system, query_text)         # the same, from a ready system message

A row is `{"id": "Step N: <query>", "conversations": [{"from": role, "value": str}, ...]}` with roles
system, user, assistant, function. Every literal below is byte-exact with ToolBench / StableToolBench
(typos included: the released models were trained on them), taken from ToolBench's repository
(github.com/OpenBMB/ToolBench) and StableToolBench's (github.com/THUNLP-MT/StableToolBench).
"""

import ast
import json
from pathlib import Path

from .schemas import FINISH_FUNCTION, functions_from_api_list, standardize

ROLES = {"system": "System", "user": "User", "function": "Function", "assistant": "Assistant"}
EOS_TEXT = "</s>"


def render(row: dict) -> str:
    """ToolBench's training text: "{Role}: {value}\\n" per message, the final assistant one ending in </s>.

    This is the text ToolLLaMA was trained on (byte for byte). Our tokenization differs on one point:
    every assistant turn ends with </s> (see encode.py).
    """
    conversations = row["conversations"]
    parts = []
    for i, message in enumerate(conversations):
        role = ROLES[message["from"]]
        last_assistant = i == len(conversations) - 1 and message["from"] == "assistant"
        parts.append(f"{role}: {message['value']}{EOS_TEXT if last_assistant else chr(10)}")
    return "".join(parts)


def user_turn(query: str) -> str:
    """The user message of a query: the query between ToolBench's newlines and "Begin!"."""
    return f"\n{query}\nBegin!\n"


def opening(system: str, query: str) -> list[dict]:
    """The [system, user] messages that open every conversation, the query wrapped by `user_turn`."""
    return [{"from": "system", "value": system}, {"from": "user", "value": user_turn(query)}]


# --------------------------------------------------------------------------------------------------
# The system prompt

_TASK_PROMPT = (
    "You are AutoGPT, you can use many tools(functions) to do the following task.\n"
    "First I will give you the task description, and your task start.\n"
    "At each step, you need to give your thought to analyze the status now and what to do next, with a "
    "function call to actually excute your step.\n"
    "After the call, you will get the call result, and you are now in a new state.\n"
    "Then you will analyze your status now, then decide what to do next...\n"
    "After many (Thought-call) pairs, you finally perform the task, then you can give your finial answer.\n"
    "Remember: \n"
    "1.the state change is irreversible, you can't go back to one of the former state, if you want to "
    'restart the task, say "I give up and restart".\n'
    "2.All the thought is short, at most in 5 sentence.\n"
    "3.You can do more then one trys, so if your plan is to continusly try some conditions, you can do one "
    "of the conditions per try.\n"
    "Let's Begin!\n"
    "Task description: You should use functions to help handle the real time user querys. Remember:\n"
    '1.ALWAYS call "Finish" function at the end of the task. And the final answer should contain enough '
    "information to show to the user,If you can't handle the task, or you find that function calls always "
    "fail(the function is not valid now), use function Finish->give_up_and_restart.\n"
    "2.Do not use origin tool names, use only subfunctions' names.\n"
    "You have access of the following tools:\n"
)
_CALL_SENTENCE = "with a function call to actually excute your step."
_FORMAT_INSTRUCTION = " Your output should follow this format:\nThought:\nAction\nAction Input:\n"
API_LIST_HEADER = "\nSpecifically, you have access to the following APIs: "
_TOOL_DESCRIPTION_CHARS = 512


def tool_list_text(tool_descriptions: list[tuple[str, str]]) -> str:
    """The numbered tool list: `{k}.{standard_tool_name}: {description}` per distinct tool.

    A tool named twice keeps its first position and its last description (ToolBench builds a dict).
    """
    tools: dict[str, str] = {}
    for name, description in tool_descriptions:
        tools[standardize(name)] = description
    lines = []
    for k, (name, description) in enumerate(tools.items(), start=1):
        text = (description or "")[:_TOOL_DESCRIPTION_CHARS].replace("\n", "").strip()
        lines.append(f"{k}.{name}: {text or 'None'}\n")
    return "".join(lines)


def add_functions_to_system(raw_system: str, functions: list[dict]) -> str:
    """ToolBench's `process_system_message`: the format instruction and `str(functions)` are added."""
    if _CALL_SENTENCE not in raw_system:
        raise ValueError(f"system message lacks ToolBench's sentence {_CALL_SENTENCE!r}: {raw_system[:200]!r}")
    with_format = raw_system.replace(_CALL_SENTENCE, _CALL_SENTENCE + _FORMAT_INSTRUCTION)
    return with_format + API_LIST_HEADER + str(functions)


def system_prompt(functions: list[dict], tool_descriptions: list[tuple[str, str]]) -> str:
    """The whole system message a ToolLLaMA model sees: instructions, tool list and the API list."""
    return add_functions_to_system(_TASK_PROMPT + tool_list_text(tool_descriptions), functions)


def split_system(system: str) -> tuple[str, list[dict]]:
    """A rendered system message -> (text before the API list, the function list); else ValueError."""
    head, sep, api_list = system.rpartition(API_LIST_HEADER)
    if not sep:
        raise ValueError(f"system message has no {API_LIST_HEADER.strip()!r} section: {system[:200]!r}...")
    try:
        functions = ast.literal_eval(api_list)
    except (SyntaxError, MemoryError, RecursionError) as err:
        raise ValueError(f"the API list of a system message is not a Python literal ({err})") from None
    if not isinstance(functions, list) or not all(isinstance(f, dict) and "name" in f for f in functions):
        raise ValueError(f"the API list of a system message is not a list of functions: {api_list[:200]!r}")
    return head, functions


def tool_index(tools_dir: str | Path) -> dict[str, Path]:
    """Standardized tool name -> tool JSON file, over `<tools_dir>/<Category>/<tool>.json`."""
    return {path.stem: path for path in sorted(Path(tools_dir).glob("*/*.json"))}


def tool_descriptions_for(api_list: list[dict], tools: dict[str, Path]) -> list[tuple[str, str]]:
    """(tool name, tool_description) for each API's tool, from the tool files (`tool_index`).

    Tools missing from the directory are left out, as StableToolBench's runner does (it keeps only
    tools present in its tool set).
    """
    pairs = []
    for api in api_list:
        path = tools.get(standardize(api["tool_name"]))
        if path is not None:
            pairs.append((api["tool_name"], json.loads(path.read_text())["tool_description"]))
    return pairs


def conversation_start(
    query: dict, tools_dir: str | Path | dict, finish: dict = FINISH_FUNCTION
) -> list[dict]:
    """[system, user] messages for a StableToolBench query, ready for `prompt_ids`.

    `tools_dir` is the tool directory (StableToolBench's tools/toolenv2404) or a ready
    `tool_index` of it (cheaper when building many prompts). The default Finish schema is the training
    data's; pass `STABLETOOLBENCH_FINISH_FUNCTION` to get StableToolBench's prompt byte for byte.
    """
    tools = tools_dir if isinstance(tools_dir, dict) else tool_index(tools_dir)
    functions = functions_from_api_list(query["api_list"], finish)
    system = system_prompt(functions, tool_descriptions_for(query["api_list"], tools))
    return opening(system, query["query"])

