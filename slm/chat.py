"""OpenAI-style conversations as the prompt text the model was trained on, and a generated step back.

    text = slm.chat.render(messages, tools)        # the prompt, ending "Assistant: " (no BOS: the tokenizer adds it)
    message = slm.chat.parse(generated, tools)     # {"role": "assistant", "content", "tool_calls", ...}

Representation (the ToolBench format, slm.toolbench, rendered as encode.py's training sequences):
- The system message is ToolBench's task prompt with its format instruction, then the client's own
  system/developer text (only as the first message; it takes the place of ToolBench's numbered tool
  list), then "Specifically, you have access to the following APIs: " and `str()` of the offered
  functions (each tool's `function` dict as given, then `Finish`), exactly as ToolBench serialises it.
- A user message's content is the query, wrapped as ToolBench does ("\\n{query}\\nBegin!\\n").
- An assistant message with one tool call is a step: the Thought is its `content` (else its
  `reasoning_content`), the Action the call's name, the Action Input the call's `arguments` string
  verbatim. An assistant message without tool calls is a Finish step: `{"return_type":"give_answer",
  "final_answer": content}` as compact JSON, the Thought its `reasoning_content` (else empty).
  Every assistant turn ends with `</s>`, as in training. One call per turn (the format's rule).
- A tool message's content is the Function turn; it must answer the call of the assistant turn before it.
`CHAT_TEMPLATE` is the same rendering as a Hugging Face chat template, shipped in every exported
checkpoint (weights.save_model), so `apply_chat_template(messages, tools=tools, tokenize=False,
add_generation_prompt=True)` equals `render(messages, tools)` byte for byte.
"""

import json
import uuid

from .toolbench.parse import ParseError, assistant_value, parse_step
from .toolbench.schemas import FINISH, FINISH_FUNCTION
from .toolbench.template import (_CALL_SENTENCE, _FORMAT_INSTRUCTION, _TASK_PROMPT, API_LIST_HEADER, EOS_TEXT,
                                 ROLES, user_turn)

SYSTEM_HEAD = _TASK_PROMPT.replace(_CALL_SENTENCE, _CALL_SENTENCE + _FORMAT_INSTRUCTION)
_COMPACT = (",", ":")


def _finish_arguments(answer: str) -> str:
    return json.dumps({"return_type": "give_answer", "final_answer": answer}, ensure_ascii=False,
                      separators=_COMPACT)


def _functions(tools) -> list[dict]:
    functions = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{name, ...}}}}, got {tool!r:.200}")
        functions.append(tool["function"])
    return functions + [FINISH_FUNCTION]


def conversations(messages: list[dict], tools=None) -> list[dict]:
    """The messages as ToolBench conversation turns ({"from", "value"}), system first; ValueError names the index."""
    client_system = ""
    turns = []
    pending_call = None   # the id of the last assistant call not yet answered
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string or null, got {type(content).__name__}")
        if role in ("system", "developer"):
            if i != 0:
                raise ValueError(f"messages[{i}]: a {role} message is only accepted as the first message")
            client_system = content or ""
        elif role == "user":
            turns.append({"from": "user", "value": user_turn(content or "")})
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if len(calls) > 1:
                raise ValueError(f"messages[{i}]: {len(calls)} tool calls; the ToolBench format has one per turn")
            if calls:
                function = calls[0].get("function") or {}
                if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
                    raise ValueError(f"messages[{i}].tool_calls[0]: expected function.name and function.arguments "
                                     "(a JSON string)")
                thought = content or message.get("reasoning_content") or ""
                value = assistant_value(thought, function["name"], function["arguments"])
                pending_call = calls[0].get("id")
            else:
                value = assistant_value(message.get("reasoning_content") or "", FINISH,
                                        _finish_arguments(content or ""))
                pending_call = None
            turns.append({"from": "assistant", "value": value})
        elif role == "tool":
            if pending_call is None or message.get("tool_call_id") != pending_call:
                raise ValueError(f"messages[{i}]: a tool message must answer the tool call of the assistant message "
                                 f"before it (tool_call_id {message.get('tool_call_id')!r}, open call {pending_call!r})")
            pending_call = None
            turns.append({"from": "function", "value": content or ""})
        else:
            raise ValueError(f"messages[{i}].role: expected system, developer, user, assistant or tool, got {role!r}")
    system = SYSTEM_HEAD + client_system + API_LIST_HEADER + str(_functions(tools))
    return [{"from": "system", "value": system}] + turns


def render(messages: list[dict], tools=None) -> str:
    """The prompt text: "{Role}: value" + "\\n" (or `</s>` after an assistant turn) per turn, then "Assistant: "."""
    parts = [f"{ROLES[t['from']]}: {t['value']}{EOS_TEXT if t['from'] == 'assistant' else chr(10)}"
             for t in conversations(messages, tools)]
    return "".join(parts) + f"{ROLES['assistant']}: "


def parse(text: str, tools=None) -> dict:
    """A generated step as an assistant message; raises `slm.toolbench.ParseError` when it does not parse
    or names a function that was not offered.

    A tool step -> content None, reasoning_content the Thought, one tool call (arguments compact JSON);
    Finish -> content the final answer ("" when it gives up), reasoning_content the Thought.
    """
    step = parse_step(text)
    if step.action == FINISH:
        return {"role": "assistant", "content": str(step.action_input.get("final_answer", "")),
                "reasoning_content": step.thought}
    offered = {f["name"] for f in _functions(tools)}
    if step.action not in offered:
        raise ParseError(f"the step calls {step.action!r}, which is not among the offered functions {sorted(offered)}")
    arguments = json.dumps(step.action_input, ensure_ascii=False, separators=_COMPACT)
    return {"role": "assistant", "content": None, "reasoning_content": step.thought,
            "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": step.action, "arguments": arguments}}]}


def _literal(text: str) -> str:
    return json.dumps(text)   # a Jinja string literal: Jinja reads JSON's escapes (\\n, \\", \\uXXXX)


# The same rendering as a Hugging Face chat template (one line: transformers trims around block tags).
# `{{ dict }}` prints Python's str(), ToolBench's serialisation; tojson(ensure_ascii=False, separators)
# is transformers' filter, matching _finish_arguments. Validation is render()'s; the template trusts its input.
CHAT_TEMPLATE = "".join([
    "{%- set ns = namespace(system='') -%}",
    "{%- if messages and messages[0].role in ['system', 'developer'] -%}{%- set ns.system = messages[0].content or '' -%}{%- endif -%}",
    "{{- " + _literal(ROLES["system"] + ": " + SYSTEM_HEAD) + " + ns.system + " + _literal(API_LIST_HEADER) + " + '[' -}}",
    "{%- for tool in tools or [] -%}{{- tool.function -}}{{- ', ' -}}{%- endfor -%}",
    "{{- " + _literal(str(FINISH_FUNCTION)) + " + ']\\n' -}}",
    "{%- for message in messages -%}",
    "{%- if message.role == 'user' -%}{{- " + _literal(ROLES["user"] + ": \n") + " + (message.content or '') + '\\nBegin!\\n\\n' -}}",
    "{%- elif message.role == 'assistant' -%}",
    "{%- if message.tool_calls -%}",
    "{{- " + _literal(ROLES["assistant"] + ": \nThought: ") + " + (message.content or message.reasoning_content or '') + '\\nAction: ' + message.tool_calls[0].function.name + '\\nAction Input: ' + message.tool_calls[0].function.arguments + " + _literal(EOS_TEXT) + " -}}",
    "{%- else -%}",
    "{{- " + _literal(ROLES["assistant"] + ": \nThought: ") + " + (message.reasoning_content or '') + '\\nAction: " + FINISH + "\\nAction Input: ' + {'return_type': 'give_answer', 'final_answer': message.content or ''} | tojson(ensure_ascii=False, separators=(',', ':')) + " + _literal(EOS_TEXT) + " -}}",
    "{%- endif -%}",
    "{%- elif message.role == 'tool' -%}{{- " + _literal(ROLES["function"] + ": ") + " + (message.content or '') + '\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- " + _literal(ROLES["assistant"] + ": ") + " -}}{%- endif -%}",
])
