"""ToolBench formats: the ToolLLaMA prompt, function schemas, the step parser, the file readers.

    from slm import toolbench
    text = toolbench.render(row)                        # ToolBench's `tool-llama-single-round` text
    fns = toolbench.functions_from_api_list(query["api_list"])
    conversations = toolbench.conversation_start(query, tools_dir)   # [system, user] for a test query
    step = toolbench.parse_step("\\nThought: ...\\nAction: f\\nAction Input: {}")
    ids, mask = toolbench.tokenize(row, tok, max_len=2048)        # training example, fitted
    prompt = toolbench.prompt_ids(history, tok, max_len=2048, reserve=256)   # the evaluator's prompt

A row is `{"id": "Step N: <query>", "conversations": [{"from": role, "value": str}, ...]}` with roles
system, user, assistant, function. Every literal below is byte-exact with ToolBench / StableToolBench
(typos included: the released models were trained on them); `../shared/docs/TOOLBENCH.md` lists them.

Debug a data file (rows with their trained tokens marked):

    python -m slm.toolbench show FILE --tokenizer DIR [--index I] [--no-collapse] [--max-len 2048]

The rendering rule (train and serve agree token for token)
-----------------------------------------------------------
A sequence is id 2 (OPT's BOS) followed by every message as "{Role}: " + value + terminator, where the
terminator is "\\n" for system, user and function messages and the single token `</s>` (id 2) for
**every** assistant message. ToolBench's own text (`toolbench.render`) ends only the final assistant
turn with `</s>` and earlier ones with "\\n"; we close every assistant turn with `</s>` because
collapsing trains several turns in one sequence, each of which must teach the model to stop, and the
evaluator renders its history the same way (TOOLBENCH.md). Each role prefix, each value and each
terminator is encoded on its own, so no BPE token straddles two of them: the prompt for a turn is
exactly the training prefix that precedes that turn's value.

Loss mask (1 = trained): the value tokens and the closing `</s>` of trained assistant turns; 0 on the
BOS, role prefixes, system/user/function text and history assistant turns.

Collapsing (default on)
-----------------------
ToolBench's rows are step-exploded: one row per assistant step, each a prefix of the next, training
only its final turn. `collapse` merges rows of the same query whose conversations are prefixes of one
another into the longest one, training every turn that was some row's final turn — the same targets,
each once, in one sequence. ToolBench's preprocessing writes a trajectory's rows one after another
(file by file); whether the 2 GB release kept that order cannot be checked here, so a row merges into
any of the last `window` (256) open trajectories of its query: rows a little out of order still merge
and memory stays bounded. Identical rows merge too (their target is trained once).

Fitting into max_len (default 2048)
-----------------------------------
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

A target is never cut: a turn that does not fit even at level 6 is dropped and counted (`too_long`).
Levels never decrease along a trajectory, so a collapsed trajectory is cut into runs of turns that
need the same level (0-5); each run is one example, earlier turns being untrained history. A level-6
turn is an example of its own. Hence every trained turn's prompt is exactly
`prompt_ids(history, tok, max_len, reserve=len(target) + 1)`; the evaluator calls it with `reserve`
= its generation budget.
"""

import ast
import json
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# The conversation template (`tool-llama-single-round`)

ROLES = {"system": "System", "user": "User", "function": "Function", "assistant": "Assistant"}
EOS_TEXT = "</s>"


def render(row: dict) -> str:
    """ToolBench's training text: "{Role}: {value}\\n" per message, the final assistant one ending in </s>.

    This is the text ToolLLaMA was trained on (byte for byte). Our tokenization differs on one point:
    every assistant turn ends with </s> (see the module docstring).
    """
    conversations = row["conversations"]
    parts = []
    for i, message in enumerate(conversations):
        role = ROLES[message["from"]]
        last_assistant = i == len(conversations) - 1 and message["from"] == "assistant"
        parts.append(f"{role}: {message['value']}{EOS_TEXT if last_assistant else chr(10)}")
    return "".join(parts)


def user_turn(query: str) -> str:
    return f"\n{query}\nBegin!\n"


# --------------------------------------------------------------------------------------------------
# Function schemas from a query's api_list (ToolBench's naming rules)

# ToolBench keeps letters, digits, `_`, CJK ideographs and (a quirk of its regex) `^`.
_NON_NAME_CHARS = re.compile(r"[^\u4e00-\u9fa5^a-zA-Z0-9_]")
_RESERVED_NAMES = {"from", "class", "return", "false", "true", "id", "and"}
_TYPE_MAP = {"NUMBER": "integer", "STRING": "string", "BOOLEAN": "boolean"}
_DESCRIPTION_CHARS = 256   # function and parameter descriptions are cut here
_TOOL_DESCRIPTION_CHARS = 512
_NAME_CHARS = 64           # OpenAI's function-name limit; ToolBench keeps the *last* 64 characters

FINISH_FUNCTION = {
    "name": "Finish",
    "description": "If you think you get the result which can answer the task, call this function to give "
    "the final answer. Or, if you think you can't handle the task from this status, call this function "
    "to restart. Remember: you should ALWAYS call this function at the end of your try, and the final "
    "answer is the ONLY part that will be showed to user, so final answer should contain enough "
    "information.",
    "parameters": {
        "type": "object",
        "properties": {
            "return_type": {"type": "string", "enum": ["give_answer", "give_up_and_restart"]},
            "final_answer": {
                "type": "string",
                "description": 'The final answer you want to give the user. You should have this field if '
                '"return_type"=="give_answer"',
            },
        },
        "required": ["return_type"],
    },
}

# StableToolBench's runner words Finish's description differently (same parameters).
STABLETOOLBENCH_FINISH_FUNCTION = {
    **FINISH_FUNCTION,
    "description": "If you believe that you have obtained a result that can answer the task, please call "
    "this function to provide the final answer. Alternatively, if you recognize that you are unable to "
    "proceed with the task in the current state, call this function to restart. Remember: you must ALWAYS "
    "call this function at the end of your attempt, and the only part that will be shown to the user is "
    "the final answer, so it should contain sufficient information.",
}


def standardize(name: str) -> str:
    """ToolBench's identifier rule: other characters -> `_`, runs collapsed, lower-case, trimmed."""
    name = re.sub(r"_+", "_", _NON_NAME_CHARS.sub("_", name)).lower().strip("_")
    return "get_" + name if name[:1].isdigit() else name


def change_name(name: str) -> str:
    """Python keywords and `id` become `is_<name>` (ToolBench's rule for API and parameter names)."""
    return "is_" + name if name in _RESERVED_NAMES else name


def _parameter_schema(param: dict) -> dict:
    schema = {
        "type": _TYPE_MAP.get(param["type"], "string"),
        "description": param["description"][:_DESCRIPTION_CHARS],
    }
    if str(param["default"]) != "":
        schema["example_value"] = param["default"]
    return schema


def function_from_api(api: dict) -> dict:
    """One api_list entry as an OpenAI-"functions"-style schema, exactly as ToolBench builds it."""
    tool = standardize(api["tool_name"])
    name = (change_name(standardize(api["api_name"])) + "_for_" + tool)[-_NAME_CHARS:]
    description = f'This is the subfunction for tool "{tool}", you can use this tool.'
    api_description = api["api_description"].strip() if api.get("api_description") else ""
    if api_description:
        # ToolBench replaces the raw API name inside its description by the function name.
        api_description = api_description.replace(api["api_name"], name)[:_DESCRIPTION_CHARS]
        description += f'The description of this function is: "{api_description}"'
    properties, required, optional = {}, [], []
    groups = [("required_parameters", required), ("optional_parameters", optional)]
    # A quirk kept on purpose: ToolBench reads the optional parameters only when the API also has
    # required ones (its optional loop sits inside the required branch).
    if not api.get("required_parameters"):
        groups = []
    for key, names in groups:
        for param in api.get(key) or []:
            param_name = change_name(standardize(param["name"]))
            properties[param_name] = _parameter_schema(param)
            names.append(param_name)
    parameters = {"type": "object", "properties": properties, "required": required, "optional": optional}
    return {"name": name, "description": description, "parameters": parameters}


def functions_from_api_list(api_list: list[dict], finish: dict = FINISH_FUNCTION) -> list[dict]:
    """The function list ToolBench shows the model for a query: one schema per API, then Finish.

    `finish` defaults to ToolBench's Finish schema, the one in every training row; StableToolBench's
    runner reworded its description (`STABLETOOLBENCH_FINISH_FUNCTION`).
    """
    return [function_from_api(api) for api in api_list] + [finish]


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

    `tools_dir` is the tool directory (e.g. ../shared/toolbench/tools/toolenv2404) or a ready
    `tool_index` of it (cheaper when building many prompts). The default Finish schema is the training
    data's; pass `STABLETOOLBENCH_FINISH_FUNCTION` to get StableToolBench's prompt byte for byte.
    """
    tools = tools_dir if isinstance(tools_dir, dict) else tool_index(tools_dir)
    functions = functions_from_api_list(query["api_list"], finish)
    system = system_prompt(functions, tool_descriptions_for(query["api_list"], tools))
    return [{"from": "system", "value": system}, {"from": "user", "value": user_turn(query["query"])}]


# --------------------------------------------------------------------------------------------------
# Parsing a generated step (ToolBench's ReAct parser)


class ParseError(ValueError):
    """A generated assistant step that does not follow "Thought: / Action: / Action Input:"."""


@dataclass
class Step:
    thought: str
    action: str
    action_input: dict


def assistant_value(thought: str, action: str, action_input: str) -> str:
    """An assistant turn's value as ToolBench writes it (the arguments stay the raw JSON string)."""
    return f"\nThought: {thought}\nAction: {action}\nAction Input: {action_input}"


def parse_step(text: str) -> Step:
    """Thought, action and parsed arguments of an assistant step; `ParseError` says what is missing.

    thought = between "Thought: " and "\\nAction: "; action = between "Action: " and
    "\\nAction Input: "; arguments = the rest, read with json.loads, then ast.literal_eval (as
    ToolBench falls back), and must be an object.
    """
    text = text.removesuffix(EOS_TEXT)
    if "Action: " not in text:
        raise ParseError(f"no 'Action: ' in the step {text[:200]!r}")
    if "\nAction Input: " not in text:
        raise ParseError(f"no '\\nAction Input: ' in the step {text[:200]!r}")
    head, _, raw_input = text.partition("\nAction Input: ")
    thought_part, sep, action = head.rpartition("Action: ")
    thought = thought_part.partition("Thought: ")[2].removesuffix("\n")
    action = action.strip()
    if not action:
        raise ParseError(f"empty action name in the step {text[:200]!r}")
    raw_input = raw_input.strip()
    try:
        arguments = json.loads(raw_input) if raw_input else {}
    except json.JSONDecodeError:
        try:
            with warnings.catch_warnings():
                # Model text like `{"value": 12in}` makes the compiler warn before it fails: the
                # ParseError below says it once, in the episode's record, not on stderr every step.
                warnings.simplefilter("ignore", SyntaxWarning)
                arguments = ast.literal_eval(raw_input)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            raise ParseError(f"action input of {action!r} is neither JSON nor a Python literal: "
                             f"{raw_input[:200]!r} ({err})") from None
    if not isinstance(arguments, dict):
        raise ParseError(f"action input of {action!r} must be an object, got {type(arguments).__name__}: "
                         f"{raw_input[:200]!r}")
    return Step(thought, action, arguments)


# --------------------------------------------------------------------------------------------------
# Rows: validation and the readers of each file kind


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


@dataclass
class Malformed:
    """Stands in a row stream for an element that could not be decoded (it is counted, then skipped)."""

    where: str


_NEXT_ELEMENT = re.compile(r",\s*\{")  # where the next array element may start


class JsonArrayReader:
    """The elements of a JSON array file, one at a time, holding about one element in memory.

        for element in JsonArrayReader(path): ...

    Elements are decoded with `json.JSONDecoder.raw_decode` over a sliding text buffer. An element that
    does not decode is yielded as a `Malformed` item and the reader resynchronises at the next `,{`
    from which a complete element (`is_element`) decodes, so a bad element costs only itself. An
    element longer than `max_element_chars` counts as malformed.
    """

    def __init__(self, path, is_element=lambda x: isinstance(x, dict), chunk_chars: int = 1 << 20,
                 max_element_chars: int = 64 << 20):
        self.path, self.is_element = path, is_element
        self.chunk_chars, self.max_element_chars = chunk_chars, max_element_chars
        self.decoder = json.JSONDecoder()

    def __iter__(self):
        with open(self.path, encoding="utf-8") as self.file:
            self.buf, self.pos, self.eof = "", 0, False
            self._skip_space()
            if self.buf[self.pos:self.pos + 1] != "[":
                raise ValueError(f"{self.path}: expected a JSON array (first character '['), "
                                 f"got {self.buf[self.pos:self.pos + 20]!r}")
            self.pos += 1
            index = 0
            while True:
                self._skip_space()
                if self.pos >= len(self.buf):
                    yield Malformed(f"{self.path}: the file ends inside the array, after element {index}")
                    return
                if self.buf[self.pos] == "]":
                    return
                if self.buf[self.pos] == "," and index > 0:
                    self.pos += 1
                    self._skip_space()
                outcome = self._decode(self.pos)
                if isinstance(outcome, json.JSONDecodeError):
                    yield Malformed(f"{self.path}: element {index}: {outcome.msg}")
                    index += 1
                    if not self._resync():
                        return
                    continue
                element, self.pos = outcome
                index += 1
                yield element

    def _fill(self, at_least: int) -> bool:
        """Drop the consumed text, then read until `at_least` characters are buffered; False at EOF."""
        self.buf, self.pos = self.buf[self.pos:], 0
        grew = False
        while not self.eof and len(self.buf) < at_least:
            chunk = self.file.read(max(self.chunk_chars, at_least - len(self.buf)))
            self.eof = not chunk
            self.buf += chunk
            grew = grew or bool(chunk)
        return grew

    def _skip_space(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill(self.chunk_chars):
                return

    def _decode(self, start: int):
        """(element, end) decoded at `start`, reading on while the buffer ends inside it; else the error."""
        while True:
            if start > self.chunk_chars:
                self.pos = start
                self._fill(0)
                start = self.pos
            try:
                return self.decoder.raw_decode(self.buf, start)
            except json.JSONDecodeError as err:
                # A buffer that stops inside an element fails at its very end or in an unterminated string.
                truncated = err.pos >= len(self.buf) - 16 or err.msg.startswith("Unterminated string")
                size = len(self.buf) - start
                if not (truncated and size < self.max_element_chars):
                    return err
                self.pos = start
                if not self._fill(2 * size + self.chunk_chars):
                    return err
                start = self.pos

    def _resync(self) -> bool:
        """Move to the next `,{` after a malformed element where a whole element decodes."""
        search_from = self.pos + 1
        while True:
            match = _NEXT_ELEMENT.search(self.buf, search_from)
            if match is None:
                if self.eof:
                    return False
                self.pos = max(self.pos, len(self.buf) - 1)   # keep the last character: it may be ","
                search_from = 0
                self._fill(self.chunk_chars)
                continue
            candidate = match.end() - 1
            self.pos = candidate
            outcome = self._decode(candidate)
            if not isinstance(outcome, json.JSONDecodeError) and self.is_element(outcome[0]):
                return True
            search_from = self.pos + 1


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
        names = [_tool_of_function(f) for f in functions if f["name"] != "Finish"]
        described = []
        for name in names:
            path = (tools or {}).get(name)
            described.append((name, json.loads(path.read_text())["tool_description"] if path else ""))
        conversations = [
            {"from": "system", "value": system_prompt(functions, described)},
            {"from": "user", "value": user_turn(item["query"])},
        ]
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
                if call["name"] != "Finish":
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
    """StableToolBench test queries: a JSON list of {query, query_id, api_list, relevant APIs}."""
    queries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(queries, list) or not all("api_list" in q and "query" in q for q in queries):
        raise ValueError(f"{path}: expected a JSON list of queries with 'query' and 'api_list'")
    return queries


# --------------------------------------------------------------------------------------------------
# Fitting levels (see the module docstring)


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


# --------------------------------------------------------------------------------------------------
# Segment encoding


class SegmentEncoder:
    """Encodes messages segment by segment (role prefix, value, terminator), with a cache of values."""

    def __init__(self, tok, cache_size: int = 1024):
        self.tok = tok
        self.bos, self.eos = tok.bos_id, tok.eos_id   # both 2 (`</s>`) for OPT
        self.prefix = {role: tok.encode(f"{name}: ", add_bos=False) for role, name in ROLES.items()}
        self.newline = tok.encode("\n", add_bos=False)
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.cache_size = cache_size

    def text(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_bos=False)
            self._cache[text] = ids
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(text)
        return ids

    def prefetch(self, texts: list[str]) -> None:
        """Encode the uncached texts in one batch (the tokenizers library spreads it over threads)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if len(missing) > 1 and hasattr(self.tok, "encode_batch"):
            for text, ids in zip(missing, self.tok.encode_batch(missing, add_bos=False)):
                self._cache[text] = ids
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def message(self, message: dict, level: Level) -> tuple[list[int], list[int]]:
        """(role prefix + value + terminator, the value part) of one message."""
        role = message["from"]
        value = self.text(message_text(message, level))
        end = [self.eos] if role == "assistant" else self.newline
        return self.prefix[role] + value + end, value

    def message_len(self, message: dict, level: Level) -> int:
        return len(self.message(message, level)[0])


@lru_cache(maxsize=8)
def encoder_for(tok) -> SegmentEncoder:
    return SegmentEncoder(tok)


# --------------------------------------------------------------------------------------------------
# Fitting one prompt


def _steps(history: list[dict]) -> list[list[int]]:
    """History message indices grouped into droppable steps: an assistant turn and what follows it.

    The messages before the first assistant turn (system, the query) are never dropped.
    """
    steps: list[list[int]] = []
    for i, message in enumerate(history):
        if message["from"] == "assistant":
            steps.append([i])
        elif steps:
            steps[-1].append(i)
    return steps


def fit_prompt(history: list[dict], enc: SegmentEncoder, budget: int):
    """(level index, kept message indices) for the first level where BOS + history + "Assistant: " <= budget.

    None when even the last level, with every droppable step gone, does not fit.
    """
    kept = list(range(len(history)))
    prefix = 1 + len(enc.prefix["assistant"])
    for index, level in enumerate(LEVELS):
        enc.prefetch([message_text(m, level) for m in history])
        lengths = [enc.message_len(m, level) for m in history]
        total = prefix + sum(lengths)
        if not level.drop_turns:
            if total <= budget:
                return index, kept
            continue
        for step in _steps(history):
            if total <= budget:
                break
            total -= sum(lengths[i] for i in step)
            kept = [i for i in kept if i not in step]
        if total <= budget:
            return index, kept
    return None


def render_ids(conversations: list[dict], level: Level, enc: SegmentEncoder, trained=()) -> tuple[list[int], list[int]]:
    """BOS + every message at `level`; mask 1 on the value and </s> of the assistant turns in `trained`."""
    ids, mask = [enc.bos], [0]
    for i, message in enumerate(conversations):
        tokens, value = enc.message(message, level)
        ids += tokens
        if i in trained:
            prefix_len = len(tokens) - len(value) - 1
            mask += [0] * prefix_len + [1] * (len(value) + 1)
        else:
            mask += [0] * len(tokens)
    return ids, mask


def prompt_ids(history: list[dict], tok, max_len: int = 2048, reserve: int = 256) -> list[int]:
    """The evaluator's prompt: BOS + the history + "Assistant: ", fitted to leave `reserve` tokens.

    `history` is the conversation so far (system, user, then assistant/function turns; an assistant
    value is the step text without `</s>`). Fitting is the training fitting, so a prompt equals the
    training prefix of the same turn whenever `reserve` equals that turn's target length + 1.
    Raises ValueError when the prompt cannot fit.
    """
    enc = encoder_for(tok)
    fitted = fit_prompt(history, enc, max_len - reserve)
    if fitted is None:
        raise ValueError(f"prompt of {len(history)} messages cannot fit {max_len} tokens with {reserve} "
                         "reserved for the reply, even with the API list at its shortest")
    index, kept = fitted
    ids, _ = render_ids([history[i] for i in kept], LEVELS[index], enc)
    return ids + enc.prefix["assistant"]


# --------------------------------------------------------------------------------------------------
# Collapsing and whole examples


@dataclass
class Chain:
    """One trajectory: its longest conversation and the indices of the assistant turns to train."""

    id: str
    query: str
    conversations: list[dict]
    trained: set[int] = field(default_factory=set)
    rows: int = 0


def _is_prefix(short: list[dict], long: list[dict]) -> bool:
    return len(short) <= len(long) and all(
        a["from"] == b["from"] and a["value"] == b["value"] for a, b in zip(short, long)
    )


def chains(rows, collapse: bool = True, window: int = 256):
    """Chains from valid rows: one per row, or (collapse) one per trajectory within `window` open ones."""
    if not collapse:
        for row in rows:
            conv = row["conversations"]
            yield Chain(row["id"], query_of(row), conv, {len(conv) - 1}, 1)
        return
    open_chains: OrderedDict[int, Chain] = OrderedDict()
    by_query: dict[str, list[int]] = {}
    for serial, row in enumerate(rows):
        conv, query = row["conversations"], query_of(row)
        for key in by_query.get(query, ()):
            chain = open_chains[key]
            if _is_prefix(conv, chain.conversations):
                break
            if _is_prefix(chain.conversations, conv):
                chain.conversations = conv
                break
        else:
            chain = open_chains[serial] = Chain(row["id"], query, conv)
            by_query.setdefault(query, []).append(serial)
            if len(open_chains) > window:
                key, oldest = open_chains.popitem(last=False)
                by_query[oldest.query].remove(key)
                if not by_query[oldest.query]:
                    del by_query[oldest.query]
                yield oldest
        chain.trained.add(len(conv) - 1)
        chain.rows += 1
    yield from open_chains.values()


@dataclass
class Example:
    ids: list[int]
    mask: list[int]
    level: int          # index into LEVELS
    turns: int          # trained assistant turns in it


def tokenize_chain(chain: Chain, enc: SegmentEncoder, max_len: int = 2048):
    """(examples, number of trained turns dropped as too long) for one chain; see the module docstring."""
    conv = chain.conversations
    plan = []  # (turn, level index, kept indices) in turn order
    dropped = 0
    for turn in sorted(chain.trained):
        target = len(enc.text(conv[turn]["value"])) + 1
        fitted = fit_prompt(conv[:turn], enc, max_len - target)
        if fitted is None:
            dropped += 1
        else:
            plan.append((turn, *fitted))
    examples = []
    i = 0
    while i < len(plan):
        turn, level, kept = plan[i]
        if LEVELS[level].drop_turns:
            ids, mask = render_ids([conv[k] for k in kept] + [conv[turn]], LEVELS[level], enc, {len(kept)})
            examples.append(Example(ids, mask, level, 1))
            i += 1
            continue
        run = [turn]
        while i + 1 < len(plan) and plan[i + 1][1] == level:
            i += 1
            run.append(plan[i][0])
        ids, mask = render_ids(conv[: run[-1] + 1], LEVELS[level], enc, set(run))
        examples.append(Example(ids, mask, level, len(run)))
        i += 1
    return examples, dropped


def tokenize(row: dict, tok, max_len: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one row, its final assistant turn trained, fitted to `max_len`.

    Raises `BadRow` (reason `too_long`) when the target cannot fit, and for malformed rows.
    """
    check_row(row)
    conv = row["conversations"]
    examples, _ = tokenize_chain(Chain(row["id"], query_of(row), conv, {len(conv) - 1}, 1), encoder_for(tok), max_len)
    if not examples:
        raise BadRow("too_long", f"{row['id'][:80]!r}: its final turn cannot fit {max_len} tokens")
    return examples[0].ids, examples[0].mask


# --------------------------------------------------------------------------------------------------
# Debugging: show a file's examples with the trained tokens marked


def show(ids: list[int], mask: list[int], tok) -> str:
    """The example's text with each trained span wrapped in ⟦ ⟧ (decoded span by span)."""
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tok.decode(ids[start:end])
            parts.append(f"⟦{text}⟧" if mask[start] else text)
            start = end
    return "".join(parts)


def main(argv=None) -> None:
    import argparse

    from slm.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m slm.toolbench",
                                     description="Print a file's training examples with trained tokens in ⟦ ⟧.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("show", help="show the examples of one input file")
    cmd.add_argument("file", help="ToolLLaMA array, DFS answer file or ToolEval converted answers")
    cmd.add_argument("--tokenizer", required=True, help="directory with vocab.json + merges.txt")
    cmd.add_argument("--index", type=int, default=None, help="show only this example (0-based)")
    cmd.add_argument("--max-len", type=int, default=2048, help="fitting length")
    cmd.add_argument("--no-collapse", action="store_true", help="one example per row")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    enc = encoder_for(tok)
    rows = (row for row in read_rows(args.file) if not isinstance(row, Malformed))
    n = 0
    for chain in chains(rows, collapse=not args.no_collapse):
        for ex in tokenize_chain(chain, enc, args.max_len)[0]:
            if args.index is None or args.index == n:
                print(f"=== example {n}: {chain.id[:100]!r} | {len(ex.ids)} tokens, {sum(ex.mask)} trained, "
                      f"{ex.turns} trained turn(s), fit level {ex.level} ({LEVELS[ex.level].name})")
                print(show(ex.ids, ex.mask, tok))
            n += 1


if __name__ == "__main__":
    main()
