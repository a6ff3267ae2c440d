"""Function schemas from a query's api_list, with ToolBench's naming rules, and the Finish function.

    fns = toolbench.functions_from_api_list(query["api_list"])   # one schema per API, then Finish

Every literal is byte-exact with ToolBench / StableToolBench (typos included: the released models were
trained on them).
"""

import re

FINISH = "Finish"   # the function that ends an episode (give_answer / give_up_and_restart)

# ToolBench keeps letters, digits, `_`, CJK ideographs and (a quirk of its regex) `^`.
_NON_NAME_CHARS = re.compile(r"[^\u4e00-\u9fa5^a-zA-Z0-9_]")
_RESERVED_NAMES = {"from", "class", "return", "false", "true", "id", "and"}
_TYPE_MAP = {"NUMBER": "integer", "STRING": "string", "BOOLEAN": "boolean"}
_DESCRIPTION_CHARS = 256   # function and parameter descriptions are cut here
_NAME_CHARS = 64           # OpenAI's function-name limit; ToolBench keeps the *last* 64 characters

FINISH_FUNCTION = {
    "name": FINISH,
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

