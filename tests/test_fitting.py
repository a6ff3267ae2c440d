"""What each fitting level (slm/toolbench/levels.py) cuts, pinned on a real ToolBench row.

    python -m pytest -q tests/test_fitting.py

The row: example 10 of the released sample (toolllama_dfs_data_example.json), ten messages with long
schemas, 1,027-character observations and a 1,425-character DFS retry note, so every level cuts something.
"""

import re

import pytest

from conftest import shared_path
from slm import toolbench

# level -> longest (function description, parameter description, string example value, tool description
# in the tool list, observation, retry note) in characters after the level's cuts (0: removed), and the
# whole conversation's length in tokens. A part a level cuts is smaller than on the line above.
CUTS = [
    ("original",     384, 122, 35, 146, 1027, 1425, 4037),
    ("short_schema", 128,  64, 32, 146, 1027, 1425, 3323),
    ("obs_512",      128,  64, 32, 146,  512, 1425, 3130),
    ("min_schema",     0,   0,  0, 128,  512, 1425, 2520),
    ("obs_128",        0,   0,  0, 128,  128, 1425, 2239),
    ("notes_256",      0,   0,  0, 128,  128,  256, 1816),
    ("drop_turns",     0,   0,  0, 128,  128,  256, 1816),   # drops whole steps instead (FITS below)
]

# The history before the final turn needs 3643, 2929, 2736, 2126, 1845, 1422 tokens at levels 0-5 (BOS and
# "Assistant: " included): a budget of exactly that fits at the level, one token less needs the next.
# Level 6 then drops the oldest steps (an assistant turn and its observation) until the rest fits.
FITS = [
    (3643, "original", 9), (3642, "short_schema", 9), (2929, "short_schema", 9), (2928, "obs_512", 9),
    (2736, "obs_512", 9), (2735, "min_schema", 9), (2126, "min_schema", 9), (2125, "obs_128", 9),
    (1845, "obs_128", 9), (1844, "notes_256", 9), (1422, "notes_256", 9), (1421, "drop_turns", 7),
    (1300, "drop_turns", 4), (1100, None, 0),
]


@pytest.fixture(scope="module")
def conversation():
    path = shared_path("toolbench", "sft", "toolllama_dfs_data_example.json")
    return list(toolbench.read_rows(path))[10]["conversations"]


def _longest(texts) -> int:
    return max(map(len, texts), default=0)


def _parts(conversation, level) -> tuple[int, ...]:
    texts = [toolbench.message_text(m, level) for m in conversation]
    head, functions = toolbench.split_system(texts[0])
    params = [p for f in functions for p in f["parameters"]["properties"].values()]
    tool_list = head.partition("You have access of the following tools:\n")[2]
    later = list(zip(conversation, texts))[2:]   # after the system message and the query
    return (_longest(f["description"] for f in functions if "description" in f),
            _longest(p["description"] for p in params if "description" in p),
            _longest(p["example_value"] for p in params if isinstance(p.get("example_value"), str)),
            _longest(re.findall(r"^\d+\.[^:\n]*: (.*)$", tool_list, re.M)),
            _longest(t for m, t in later if m["from"] == "function"),
            _longest(t for m, t in later if m["from"] == "user"))


@pytest.mark.parametrize("name, expected", [(row[0], row[1:]) for row in CUTS], ids=[row[0] for row in CUTS])
def test_what_each_level_cuts(conversation, opt_tokenizer, name, expected):
    level = next(level for level in toolbench.LEVELS if level.name == name)
    ids, _ = toolbench.render_ids(conversation, level, toolbench.encoder_for(opt_tokenizer))
    assert (*_parts(conversation, level), len(ids)) == expected


def test_levels_are_these_in_this_order():
    assert [level.name for level in toolbench.LEVELS] == [row[0] for row in CUTS]


def test_every_level_keeps_every_function_and_parameter_name(conversation):
    def names(system):
        _, functions = toolbench.split_system(system)
        return [(f["name"], sorted(f["parameters"]["properties"])) for f in functions]

    released = names(conversation[0]["value"])
    assert len(released) == 11   # ten APIs and Finish
    for level in toolbench.LEVELS:
        assert names(toolbench.message_text(conversation[0], level)) == released, level.name


@pytest.mark.parametrize("budget, name, kept", FITS, ids=[str(row[0]) for row in FITS])
def test_the_first_level_that_fits_a_budget(conversation, opt_tokenizer, budget, name, kept):
    history = conversation[:-1]
    fitted = toolbench.fit_prompt(history, toolbench.encoder_for(opt_tokenizer), budget)
    if name is None:
        assert fitted is None
        return
    index, kept_indices = fitted
    assert toolbench.LEVELS[index].name == name and len(kept_indices) == kept
    # the system message and the query are never dropped; what is dropped is whole oldest steps
    assert kept_indices[:2] == [0, 1] and kept_indices[2:] == list(range(len(history) - kept + 2, len(history)))
