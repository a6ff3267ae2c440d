"""ToolBench formats: the ToolLLaMA prompt, function schemas, the step parser, the file readers, and the
training examples (ids + loss mask) fitted into the model's context.

    from slm import toolbench
    text = toolbench.render(row)                        # ToolBench's `tool-llama-single-round` text
    fns = toolbench.functions_from_api_list(query["api_list"])
    conversations = toolbench.conversation_start(query, tools_dir)   # [system, user] for a test query
    step = toolbench.parse_step("\\nThought: ...\\nAction: f\\nAction Input: {}")
    ids, mask = toolbench.tokenize(row, tok, max_len=2048)        # training example, fitted
    prompt = toolbench.prompt_ids(history, tok, max_len=2048, reserve=256)   # the evaluator's prompt

A row is `{"id": "Step N: <query>", "conversations": [{"from": role, "value": str}, ...]}` with roles
system, user, assistant, function. One concept per file, in the order a row travels:

    schemas.py     function schemas from an api_list (ToolBench's naming rules) and Finish (`FINISH`)
    template.py    the conversation template: roles, system prompt, the [system, user] `opening`
    parse.py       an assistant step written (`assistant_value`) and parsed (`parse_step`)
    json_array.py  the streaming reader of a JSON array file too big to load
    readers.py     row validation (`check_row`) and the readers of each file kind
    collapse.py    step-exploded rows merged into trajectories (`chains`)
    levels.py      the levels that cut a prompt's text until it fits max_len (`LEVELS`, `message_text`)
    encode.py      ids and loss mask built segment by segment (`tokenize`, `tokenize_chain`, `prompt_ids`),
                   and the first level at which a prompt fits (`fit_prompt`)
    show.py        the mask visualiser: python -m slm.toolbench show FILE --tokenizer DIR
"""

from .collapse import Chain, chains
from .encode import (Example, SegmentEncoder, encoder_for, fit_prompt, prompt_ids, render_ids, tokenize,
                     tokenize_chain)
from .levels import LEVELS, Level, compact_system, message_text
from .json_array import JsonArrayReader, Malformed
from .parse import ACTION, ACTION_INPUT, THOUGHT, ParseError, Step, assistant_value, parse_step
from .readers import (BadRow, check_row, detect_format, dfs_rows, query_of, read_queries, read_rows,
                      tooleval_rows)
from .schemas import (FINISH, FINISH_FUNCTION, STABLETOOLBENCH_FINISH_FUNCTION, change_name, function_from_api,
                      functions_from_api_list, standardize)
from .show import main, show
from .template import (API_LIST_HEADER, EOS_TEXT, ROLES, add_functions_to_system, conversation_start, opening,
                       render, split_system, system_prompt, tool_descriptions_for, tool_index, tool_list_text,
                       user_turn)

__all__ = [
    "Chain", "chains", "Example", "SegmentEncoder", "encoder_for", "prompt_ids", "render_ids", "tokenize",
    "tokenize_chain", "LEVELS", "Level", "compact_system", "fit_prompt", "message_text", "JsonArrayReader",
    "Malformed", "ACTION", "ACTION_INPUT", "THOUGHT", "ParseError", "Step", "assistant_value", "parse_step",
    "BadRow", "check_row", "detect_format",
    "dfs_rows", "query_of", "read_queries", "read_rows", "tooleval_rows", "FINISH", "FINISH_FUNCTION",
    "STABLETOOLBENCH_FINISH_FUNCTION", "change_name", "function_from_api", "functions_from_api_list",
    "standardize", "main", "show", "API_LIST_HEADER", "EOS_TEXT", "ROLES", "add_functions_to_system",
    "conversation_start", "opening", "render", "split_system", "system_prompt", "tool_descriptions_for",
    "tool_index", "tool_list_text", "user_turn",
]
