"""Tests of slm/toolbench/ against the real ToolBench files in ../shared/toolbench.

    pytest tests/test_toolbench.py
"""

import json
from collections import Counter
from pathlib import Path

import pytest

from slm import toolbench

SHARED = Path(__file__).resolve().parents[2] / "shared"
TB = SHARED / "toolbench"
SFT = TB / "sft" / "toolllama_dfs_data_example.json"
STB = TB / "trajectories" / "stabletoolbench_example" / "virtual_chatgpt_dfs" / "G1_instruction"
needs_data = pytest.mark.skipif(not SFT.is_file(), reason=f"real ToolBench data not found at {TB}")
needs_opt = pytest.mark.skipif(not (SHARED / "opt" / "merges.txt").is_file(),
                               reason=f"OPT tokenizer files not found at {SHARED / 'opt'}")


@pytest.fixture(scope="module")
def sft_rows():
    return json.loads(SFT.read_text())


@pytest.fixture(scope="module")
def tok(opt_tokenizer):  # conftest.py's session-wide OPT tokenizer
    return opt_tokenizer


# --------------------------------------------------------------------------------------------------
# Formats


@needs_data
def test_render_matches_the_documented_template(sft_rows):
    names = {"system": "System", "user": "User", "function": "Function", "assistant": "Assistant"}
    for row in sft_rows:
        expected = ""
        for message in row["conversations"]:
            expected += names[message["from"]] + ": " + message["value"] + "\n"
        assert expected.endswith("\n") and row["conversations"][-1]["from"] == "assistant"
        expected = expected[:-1] + "</s>"
        assert toolbench.render(row) == expected


@needs_data
def test_dfs_answer_files_give_the_sft_rows(sft_rows):
    rows = []
    for path in sorted((TB / "trajectories" / "toolbench_dfs").glob("*/*.json")):
        rows += list(toolbench.read_rows(path))
    key = lambda row: (row["id"], json.dumps(row["conversations"]))  # noqa: E731
    assert Counter(map(key, rows)) == Counter(map(key, sft_rows))


@needs_data
@pytest.mark.parametrize("query_id", [588, 608, 1073])
def test_function_lists_and_system_prompts_of_test_queries(query_id):
    queries = toolbench.read_queries(TB / "queries" / "stabletoolbench_solvable" / "test_instruction"
                                     / "G1_instruction.json")
    query = next(q for q in queries if q["query_id"] == query_id)
    generation = json.loads((STB / f"{query_id}_DFS_woFilter_w2.json").read_text())["answer_generation"]
    functions = toolbench.functions_from_api_list(query["api_list"], toolbench.STABLETOOLBENCH_FINISH_FUNCTION)
    assert functions == generation["function"]
    assert str(functions) == str(generation["function"])  # key order too: the prompt shows str()
    raw_system, user = generation["train_messages"][0][:2]
    expected = toolbench.add_functions_to_system(raw_system["content"], generation["function"])
    # 608's and 1073's tools are not in ToolEnv2404: their descriptions come from the prompt itself
    line = raw_system["content"].rpartition("You have access of the following tools:\n1.")[2]
    name, _, description = line.rstrip("\n").partition(": ")
    assert toolbench.system_prompt(functions, [(query["api_list"][0]["tool_name"], description)]) == expected
    if query_id == 588:
        start = toolbench.conversation_start(query, TB / "tools" / "toolenv2404",
                                             toolbench.STABLETOOLBENCH_FINISH_FUNCTION)
        assert start == [{"from": "system", "value": expected}, {"from": "user", "value": user["content"]}]
    assert toolbench.user_turn(query["query"]) == user["content"]


def test_naming_rules():
    assert toolbench.standardize("Kick.com API | Kick API") == "kick_com_api_kick_api"
    assert toolbench.standardize("  __9gag--Memes__ ") == "get_9gag_memes"
    assert toolbench.change_name("id") == "is_id" and toolbench.change_name("ids") == "ids"
    api = {"tool_name": "T" * 10, "api_name": "a" * 80, "api_description": "", "required_parameters": [],
           "optional_parameters": [{"name": "x", "type": "STRING", "description": "", "default": ""}]}
    fn = toolbench.function_from_api(api)
    assert len(fn["name"]) == 64 and fn["name"].endswith("_for_tttttttttt")
    assert fn["parameters"]["properties"] == {}  # ToolBench reads optional ones only with required ones
    assert toolbench.functions_from_api_list([api])[-1]["name"] == "Finish"


def test_tool_list_dedups_cuts_and_fills_none():
    text = toolbench.tool_list_text([("My Tool", "a\nb" + "c" * 600), ("Other", ""), ("my_tool", "second")])
    assert text == "1.my_tool: second\n2.other: None\n"
    assert toolbench.tool_list_text([("X", "d\n" * 300)]) == "1.x: " + "d" * 256 + "\n"


# --------------------------------------------------------------------------------------------------
# Step parser


@needs_data
def test_parse_step_reads_every_real_assistant_turn(sft_rows):
    for row in sft_rows:
        for message in row["conversations"]:
            if message["from"] == "assistant":
                step = toolbench.parse_step(message["value"])
                assert step.action and isinstance(step.action_input, dict)


def test_parse_step_cases():
    step = toolbench.parse_step('\nThought: look it up\nAction: f_for_t\nAction Input: {"a": 1}</s>')
    assert (step.thought, step.action, step.action_input) == ("look it up", "f_for_t", {"a": 1})
    assert toolbench.parse_step("\nThought: \nAction: g\nAction Input: {'b': True}").action_input == {"b": True}
    assert toolbench.parse_step("Action: g\nAction Input: ").action_input == {}
    for bad, words in [("Thought: hi", "no 'Action: '"), ("Action: f\nInput: {}", "Action Input"),
                       ("Action: f\nAction Input: {nope", "neither JSON"), ("Action: f\nAction Input: [1]", "object"),
                       ("Action: \nAction Input: {}", "empty action")]:
        with pytest.raises(toolbench.ParseError, match=words):
            toolbench.parse_step(bad)


def test_parse_step_is_silent_on_malformed_numbers(recwarn):
    """`12in` makes Python's compiler warn before it fails; the ParseError alone reports it."""
    with pytest.raises(toolbench.ParseError, match="neither JSON"):
        toolbench.parse_step('Action: f\nAction Input: {"value": 12in}')
    assert not [w for w in recwarn if issubclass(w.category, SyntaxWarning)]


# --------------------------------------------------------------------------------------------------
# Readers


def test_streaming_reader_on_a_large_generated_array(tmp_path):
    rows = [{"id": f"Step {i}: q{i % 7}", "conversations": [{"from": "user", "value": "x" * (i * 37 % 5000)}]}
            for i in range(2000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, indent=4))
    assert list(toolbench.JsonArrayReader(path, chunk_chars=4096)) == rows


def test_streaming_reader_skips_a_malformed_element_and_resynchronises(tmp_path):
    good = [{"id": f"Step 1: q{i}", "conversations": [{"from": "user", "value": f"v{i}, {{x}}"}]} for i in range(5)]
    parts = [json.dumps(r) for r in good]
    parts.insert(2, '{"id": "broken", "conversations": [{"from": "user", "value": "oops}]}')   # unterminated
    parts.insert(4, '{"id": "Step 1: bad", "conversations": [{"from": "user", "value": 1,,}]}')
    path = tmp_path / "bad.json"
    path.write_text("[\n" + ",\n".join(parts) + "\n]")
    items = list(toolbench.JsonArrayReader(path, chunk_chars=64,
                                           is_element=lambda x: isinstance(x, dict) and "conversations" in x))
    assert [i for i in items if not isinstance(i, toolbench.Malformed)] == good
    assert sum(isinstance(i, toolbench.Malformed) for i in items) == 2
    path.write_text(path.read_text()[:-40])  # a file cut off inside the array
    items = list(toolbench.JsonArrayReader(path, chunk_chars=64))
    assert isinstance(items[-1], toolbench.Malformed) and items[:2] == good[:2]


def test_check_row_reasons():
    ok = {"id": "Step 1: q", "conversations": [{"from": "user", "value": "u"}, {"from": "assistant", "value": "a"}]}
    assert toolbench.check_row(ok) is ok
    cases = {
        "missing_field": [{"conversations": []}, {"id": "x"}, {"id": "x", "conversations": [{"from": "user"}]}],
        "unknown_role": [{"id": "x", "conversations": [{"from": "human", "value": "h"}]}],
        "empty_assistant": [{"id": "x", "conversations": [{"from": "assistant", "value": " \n"}]}],
        "eos_in_assistant": [{"id": "x", "conversations": [{"from": "assistant", "value": "a</s>b"}]}],
        "no_assistant": [{"id": "x", "conversations": [{"from": "user", "value": "u"}]}],
    }
    for reason, rows in cases.items():
        for row in rows:
            with pytest.raises(toolbench.BadRow) as err:
                toolbench.check_row(row)
            assert err.value.reason == reason


@needs_data
def test_tooleval_answers_become_rows():
    path = (TB / "eval_reference" / "stabletoolbench_example" / "model_predictions_converted" / "virtual_chatgpt_cot"
            / "G1_instruction.json")
    assert toolbench.detect_format(path) == "tooleval"
    rows = list(toolbench.read_rows(path, tools=toolbench.tool_index(TB / "tools" / "toolenv2404")))
    assert rows and all(toolbench.check_row(r) for r in rows)
    assert rows[0]["conversations"][0]["value"].startswith("You are AutoGPT")
    assert any(toolbench.parse_step(r["conversations"][-1]["value"]).action == "Finish" for r in rows)


# --------------------------------------------------------------------------------------------------
# Tokenization, masks, collapsing, fitting


def _trained_spans(ids, mask):
    spans, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(ids[start:i])
            start = None
    return spans


@needs_data
@needs_opt
@pytest.mark.parametrize("collapse", [False, True])
@pytest.mark.parametrize("max_len", [2048, 1024])
def test_trained_spans_are_exactly_assistant_turns(sft_rows, tok, collapse, max_len):
    enc = toolbench.encoder_for(tok)
    trained_turns = dropped = 0
    for chain in toolbench.chains(sft_rows, collapse=collapse):
        examples, n_dropped = toolbench.tokenize_chain(chain, enc, max_len)
        dropped += n_dropped
        function_names = [f["name"] for f in toolbench.split_system(chain.conversations[0]["value"])[1]]
        targets = [chain.conversations[t]["value"] for t in sorted(chain.trained)]
        seen = []
        for ex in examples:
            assert len(ex.ids) == len(ex.mask) <= max_len and ex.ids[0] == 2
            text = tok.decode(ex.ids)
            assert all(f"'name': '{name}'" in text for name in function_names)  # fitting keeps every name
            spans = [tok.decode(span) for span in _trained_spans(ex.ids, ex.mask)]
            assert len(spans) == ex.turns
            for span in spans:
                assert span.endswith("</s>") and span[:-4] in targets  # whole assistant value + </s>
            seen += [span[:-4] for span in spans]
            trained_turns += ex.turns
        assert Counter(seen) <= Counter(targets)
    assert trained_turns + dropped == (30 if not collapse else sum(len(c.trained) for c in toolbench.chains(sft_rows)))
    if max_len == 2048:
        assert dropped == 0


@needs_data
@needs_opt
def test_tokenize_masks_only_the_final_turn_and_prefixes_match_prompt_ids(sft_rows, tok):
    enc = toolbench.encoder_for(tok)
    for row in sft_rows:
        ids, mask = toolbench.tokenize(row, tok, 2048)
        conv = row["conversations"]
        spans = _trained_spans(ids, mask)
        assert len(spans) == 1 and tok.decode(spans[0]) == conv[-1]["value"] + "</s>"
        assert mask[-len(spans[0]):] == [1] * len(spans[0]) and ids[-1] == 2
        reserve = len(enc.text(conv[-1]["value"])) + 1
        assert toolbench.prompt_ids(conv[:-1], tok, 2048, reserve) == ids[:-reserve]


@needs_data
@needs_opt
def test_every_trained_turn_of_a_collapsed_example_has_the_evaluators_prompt(sft_rows, tok):
    enc = toolbench.encoder_for(tok)
    checked = 0
    for chain in toolbench.chains(sft_rows):
        examples, dropped = toolbench.tokenize_chain(chain, enc, 2048)
        assert dropped == 0
        turns = iter(sorted(chain.trained))  # examples hold the trained turns in order
        for ex in examples:
            for start in [i for i in range(1, len(ex.mask)) if ex.mask[i] and not ex.mask[i - 1]]:
                turn = next(turns)
                target = len(enc.text(chain.conversations[turn]["value"])) + 1
                assert tok.decode(ex.ids[start:start + target]) == chain.conversations[turn]["value"] + "</s>"
                # drop_turns examples included: prompt_ids drops the same history steps
                prompt = toolbench.prompt_ids(chain.conversations[:turn], tok, 2048, target)
                assert prompt == ex.ids[:start]
                checked += 1
    assert checked == 30


@needs_data
@needs_opt
def test_collapsing_saves_tokens_and_keeps_targets(sft_rows, tok):
    enc = toolbench.encoder_for(tok)
    totals = {}
    for collapse in (False, True):
        examples = [ex for chain in toolbench.chains(sft_rows, collapse)
                    for ex in toolbench.tokenize_chain(chain, enc)[0]]
        totals[collapse] = (sum(len(e.ids) for e in examples), sum(e.turns for e in examples))
    assert totals[True][1] == totals[False][1] == 30
    assert totals[True][0] < 0.8 * totals[False][0]


def test_collapse_window_and_order():
    def row(query, n):
        conv = [{"from": "user", "value": query}]
        for i in range(n):
            conv += [{"from": "assistant", "value": f"a{i}"}, {"from": "function", "value": f"o{i}"}]
        return {"id": f"Step {n}: {query}", "conversations": conv[:-1]}

    rows = [row("q1", 1), row("q2", 1), row("q1", 2), row("q1", 2), row("q2", 2), row("q1", 3)]
    merged = list(toolbench.chains(rows))
    assert [(c.query, len(c.conversations), sorted(c.trained), c.rows) for c in merged] == [
        ("q1", 6, [1, 3, 5], 4), ("q2", 4, [1, 3], 2)]
    narrow = list(toolbench.chains(rows, window=1))   # q1 closes when q2 opens
    assert [c.query for c in narrow] == ["q1", "q2", "q1", "q2", "q1"]
    assert sum(len(c.trained) for c in narrow) == 5


@needs_opt
def test_a_target_that_cannot_fit_is_dropped_not_cut(tok):
    row = {"id": "Step 1: q", "conversations": [
        {"from": "user", "value": "\nq\nBegin!\n"},
        {"from": "assistant", "value": "\nThought: " + "long " * 300 + "\nAction: f\nAction Input: {}"}]}
    with pytest.raises(toolbench.BadRow, match="too_long"):
        toolbench.tokenize(row, tok, max_len=128)
    with pytest.raises(ValueError, match="cannot fit"):
        toolbench.prompt_ids(row["conversations"][:1], tok, max_len=16, reserve=12)


@needs_data
@needs_opt
def test_show_marks_the_trained_tokens(capsys):
    toolbench.main(["show", str(SFT), "--tokenizer", str(SHARED / "opt"), "--index", "0"])
    out = capsys.readouterr().out
    assert out.startswith("=== example 0:") and out.count("=== example") == 1
    assert "Assistant: ⟦\nThought: " in out and out.rstrip().endswith("</s>⟧")
