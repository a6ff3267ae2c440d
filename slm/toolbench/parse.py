"""An assistant step, written and parsed as ToolBench's ReAct format: Thought, Action, Action Input.

    value = toolbench.assistant_value(thought, "get_weather_for_weather", '{"city": "Paris"}')
    step = toolbench.parse_step("\\nThought: ...\\nAction: f\\nAction Input: {}")
"""

import ast
import json
import warnings
from dataclasses import dataclass

from .template import EOS_TEXT

# The step's separators; the arguments begin after the first ACTION_INPUT.
THOUGHT, ACTION, ACTION_INPUT = "\nThought: ", "\nAction: ", "\nAction Input: "


class ParseError(ValueError):
    """A generated assistant step that does not follow "Thought: / Action: / Action Input:"."""


@dataclass
class Step:
    thought: str
    action: str
    action_input: dict


def assistant_value(thought: str, action: str, action_input: str) -> str:
    """An assistant turn's value as ToolBench writes it (the arguments stay the raw JSON string)."""
    return f"{THOUGHT}{thought}{ACTION}{action}{ACTION_INPUT}{action_input}"


def parse_step(text: str) -> Step:
    """Thought, action and parsed arguments of an assistant step; `ParseError` says what is missing.

    thought = between "Thought: " and "\\nAction: "; action = between "Action: " and
    "\\nAction Input: "; arguments = the rest, read with json.loads, then ast.literal_eval (as
    ToolBench falls back), and must be an object.
    """
    text = text.removesuffix(EOS_TEXT)
    if "Action: " not in text:
        raise ParseError(f"no 'Action: ' in the step {text[:200]!r}")
    if ACTION_INPUT not in text:
        raise ParseError(f"no '\\nAction Input: ' in the step {text[:200]!r}")
    head, _, raw_input = text.partition(ACTION_INPUT)
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

