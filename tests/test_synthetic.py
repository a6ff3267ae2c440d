"""Tests of data/synthetic.py: determinism, disjoint splits, executable gold trajectories, scoring.

    python -m pytest -q tests/test_synthetic.py
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data import synthetic
from slm import toolbench

N = 300   # tasks per split in the bulk checks: enough to draw every task type and tool kind many times


@pytest.fixture(scope="module")
def tasks():
    return {split: synthetic.make_tasks(split, N, seed=0) for split in synthetic.SPLITS}


def _names(task_list):
    """The generated names of some tasks: tool words, entities, and the words of string tasks."""
    tools, entities = set(), set()
    for task in task_list:
        tools |= {api["tool_name"].split()[0] for api in task["api_list"]}
        for table in task["world"]["tables"].values():
            entities |= set(table)
        entities |= {args["text"] for _, _, args in task["solution"]["steps"] if "text" in args}
    return tools, entities


def _gold_calls(row):
    """(function_name, arguments, observation) per tool call of a trajectory row, and its final answer."""
    messages = row["conversations"]
    calls, final_answer = [], None
    for i, message in enumerate(messages):
        if message["from"] != "assistant":
            continue
        step = toolbench.parse_step(message["value"])
        if step.action == toolbench.FINISH:
            final_answer = step.action_input["final_answer"]
        else:
            calls.append((step.action, step.action_input, messages[i + 1]["value"]))
    return calls, final_answer


def test_a_seed_fixes_everything():
    first = synthetic.make_tasks("train", 50, seed=3)
    assert json.dumps(first) == json.dumps(synthetic.make_tasks("train", 50, seed=3))
    assert json.dumps(first[:20]) == json.dumps(synthetic.make_tasks("train", 20, seed=3)), \
        "a shorter run must be a prefix of a longer one"
    assert json.dumps(first) != json.dumps(synthetic.make_tasks("train", 50, seed=4))


def test_a_task_file_is_self_contained(tasks):
    # The evaluator reads tasks back from JSON: their trajectories must come out the same, and building
    # one must leave its task as it was (it is scored afterwards).
    written = json.dumps(tasks["test"])
    read_back = json.loads(written)
    assert [synthetic.trajectory(t) for t in read_back] == [synthetic.trajectory(t) for t in tasks["test"]]
    assert json.dumps(tasks["test"]) == written, "trajectory() changed the task it replayed"


def test_train_and_test_share_no_tool_or_entity_name(tasks):
    train_tools, train_entities = _names(tasks["train"] + synthetic.make_tasks("train", N, seed=1))
    test_tools, test_entities = _names(tasks["test"] + synthetic.make_tasks("test", N, seed=1))
    train_names, test_names = train_tools | train_entities, test_tools | test_entities
    assert not train_names & test_names, f"names in both splits: {sorted(train_names & test_names)[:10]}"
    # Disjointness comes from the hash partition, so it holds for any seed, not just these.
    assert {synthetic.split_of(n) for n in train_names} == {"train"}
    assert {synthetic.split_of(n) for n in test_names} == {"test"}
    assert len(test_tools) > 100 and len(test_entities) > 300, "the test split should have many names"


def test_tasks_have_the_stabletoolbench_shape(tasks):
    types = Counter()
    for task in tasks["train"] + tasks["test"]:
        types[task["task_type"]] += 1
        assert isinstance(task["query_id"], int) and task["query"]
        api_keys = {"category_name", "tool_name", "api_name", "api_description", "required_parameters",
                    "optional_parameters", "method", "template_response"}
        assert all(set(api) == api_keys for api in task["api_list"])
        per_tool = Counter(api["tool_name"] for api in task["api_list"])
        assert 2 <= len(per_tool) <= 4 and set(per_tool.values()) <= {2, 3}, per_tool
        # One tool per kind, so the right function is never ambiguous.
        api_names = [api["api_name"] for api in task["api_list"]]
        assert len(api_names) == len(set(api_names)), api_names
        pairs = {(api["tool_name"], api["api_name"]) for api in task["api_list"]}
        assert task["relevant APIs"] and all(tuple(p) in pairs for p in task["relevant APIs"])
        assert [name for name, _ in task["tool_descriptions"]] == list(per_tool)
        assert task["answer"] and all(isinstance(v, str) for v in task["answer"])
        json.dumps(task)   # self-contained and serializable
    assert set(types) == set(synthetic.TASK_TYPES), types


def test_gold_trajectories_execute_parse_and_pass(tasks):
    for task in tasks["train"] + tasks["test"]:
        row = synthetic.trajectory(task)
        messages = row["conversations"]
        assert [m["from"] for m in messages[:2]] == ["system", "user"]
        assert messages[1]["value"] == toolbench.user_turn(task["query"])
        assert row["id"] == f"Step {len(messages) - 1}: {task['query']}"
        _, functions = toolbench.split_system(messages[0]["value"])
        assert functions == toolbench.functions_from_api_list(task["api_list"])
        assert toolbench.render(row).endswith("</s>")

        calls, final_answer = _gold_calls(row)
        steps = task["solution"]["steps"]
        assert [(name, args) for name, args, _ in calls] == [(name, args) for _, name, args in steps]
        for name, args, observation in calls:
            assert json.loads(observation)["error"] == "", (task["query"], name, observation)
            assert observation == synthetic.execute(task, name, args)
        result = synthetic.score(task, calls, final_answer)
        assert result["pass"], (task["query"], final_answer, result["reasons"])
        assert {tuple(p) for p in task["relevant APIs"]} <= {
            (api["tool_name"], api["api_name"]) for api in task["api_list"]}


def test_exploded_rows_end_at_each_assistant_step(tasks):
    row = synthetic.trajectory(tasks["train"][0])
    steps = synthetic.explode(row)
    assistant_turns = [i for i, m in enumerate(row["conversations"]) if m["from"] == "assistant"]
    assert len(steps) == len(assistant_turns)
    for step, i in zip(steps, assistant_turns):
        assert step["id"] == f"Step {i}: {tasks['train'][0]['query']}"
        assert step["conversations"] == row["conversations"][:i + 1]
    assert steps[-1]["conversations"] == row["conversations"]


def test_action_input_is_formatted_like_chatgpt_rows(tasks):
    task = next(t for t in tasks["train"] if t["task_type"] == "lookup")
    value = synthetic.trajectory(task)["conversations"][2]["value"]
    _, name, args = task["solution"]["steps"][0]
    (param, entity), = args.items()
    assert value.endswith(f'\nAction: {name}\nAction Input: {{\n  "{param}": "{entity}"\n}}'), value


def _task_of_type(tasks, task_type):
    return next(t for t in tasks["test"] if t["task_type"] == task_type)


def test_execute_reports_errors_in_toolbench_shape(tasks):
    task = _task_of_type(tasks, "chain")
    (_, lookup, args), (_, convert, _) = task["solution"]["steps"]
    (param, entity), = args.items()

    def error(name, arguments):
        observation = json.loads(synthetic.execute(task, name, arguments))
        assert set(observation) == {"error", "response"} and observation["response"] == ""
        return observation["error"]

    assert "No such function" in error("nope_for_nothing", {})
    assert "No such function" in error(toolbench.FINISH, {"return_type": "give_answer"})
    assert "Missing required parameter" in error(lookup, {})
    assert "Unexpected parameter" in error(lookup, {param: entity, "extra": 1})
    assert "must be a non-empty string" in error(lookup, {param: 7})
    assert "was found" in error(lookup, {param: "Nobody"})
    assert "must be a number" in error(convert, {next(iter(synthetic._api_entry(
        task, convert)["required_parameters"]))["name"]: "lots"})
    assert "must be a JSON object" in error(lookup, [entity])
    # Entity names match case-insensitively, and numeric strings are accepted as numbers.
    assert json.loads(synthetic.execute(task, lookup, {param: entity.upper()}))["error"] == ""


def test_execute_computes_each_kind_of_function(tasks):
    expected = {"add": "{'result': 14}", "subtract": "{'result': 6.5}", "multiply": "{'result': 35}",
                "reverse": "{'result': 'leM'}", "uppercase": "{'result': 'MEL'}", "count": "{'result': 3}",
                "celsius to fahrenheit": "{'fahrenheit': 50}", "meters to feet": "{'feet': 32.81}"}
    arguments = {"add": {"a": 10.5, "b": "3.5"}, "subtract": {"a": 10, "b": 3.5},
                 "multiply": {"a": 10, "b": 3.5},
                 "reverse": {"text": "Mel"}, "uppercase": {"text": "Mel"}, "count": {"text": "Mel"},
                 "celsius to fahrenheit": {"value": 10}, "meters to feet": {"value": "10"}}
    seen = set()
    for task in tasks["train"]:
        for api, function in zip(task["api_list"], toolbench.functions_from_api_list(task["api_list"])):
            op = task["world"]["functions"][function["name"]]["op"]
            key = api["api_name"] if op == "convert" else op
            if key in expected:
                observation = synthetic.execute(task, function["name"], arguments[key])
                assert observation == json.dumps({"error": "", "response": expected[key]}), (key, observation)
                seen.add(key)
    assert seen == set(expected)


def test_score_fails_wrong_answers_and_invalid_calls(tasks):
    task = _task_of_type(tasks, "arithmetic")
    calls, final_answer = _gold_calls(synthetic.trajectory(task))
    assert synthetic.score(task, calls, final_answer)["pass"]

    value = task["answer"][0]
    wrong = synthetic.score(task, calls, final_answer.replace(value, str(float(value) + 1)))
    assert not wrong["pass"] and not wrong["answer_ok"] and wrong["missing"] == [value]
    # A number that merely contains the answer's digits is not the answer.
    assert not synthetic.score(task, calls, f"The total is {value}5.")["pass"]
    assert not synthetic.score(task, calls, None)["pass"]
    assert not synthetic.score(task, calls, "")["pass"]

    bad_call = (calls[0][0], {"nonsense": 1}, "")
    invalid = synthetic.score(task, calls + [bad_call], final_answer)
    assert not invalid["pass"] and invalid["answer_ok"] and not invalid["calls_ok"]
    assert invalid["invalid_calls"][0][0] == len(calls) and invalid["reasons"]
    assert not synthetic.score(task, [("made_up_function", {}, "")], final_answer)["pass"]


def test_score_compares_numbers_canonically(tasks):
    task = dict(_task_of_type(tasks, "lookup"), answer=["1234.5"])
    assert synthetic.score(task, [], "It is 1,234.50 in total.")["pass"]
    assert synthetic.score(task, [], "It is 1234.5.")["pass"]
    assert not synthetic.score(task, [], "It is 1234.")["pass"]
    text_task = dict(task, answer=["kivraT"])
    assert synthetic.score(text_task, [], "'Tarvik' reversed is 'kivraT'.")["pass"]
    assert not synthetic.score(text_task, [], "'Tarvik' reversed is 'KIVRAT'.")["pass"]
    assert synthetic.canonical(100.0) == "100" and synthetic.canonical("7.10") == "7.1"


def test_command_line_writes_train_rows_and_test_tasks(tmp_path):
    # A separate process with another hash seed: the command runs as documented (from the repository
    # root, nothing else on the path), and what it writes does not depend on Python's string hashing.
    command = [sys.executable, "-m", "data.synthetic", "--out", str(tmp_path), "--train", "12", "--test", "5",
               "--seed", "2"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run(command, check=True, cwd=Path(synthetic.__file__).parents[1], env=dict(env, PYTHONHASHSEED="123"))
    rows = json.loads((tmp_path / "train.json").read_text())
    expected = [step for t in synthetic.make_tasks("train", 12, seed=2)
                for step in synthetic.explode(synthetic.trajectory(t))]
    assert rows == expected
    assert all(toolbench.check_row(row) for row in rows)
    test = json.loads((tmp_path / "test" / "synthetic.json").read_text())
    assert test == synthetic.make_tasks("test", 5, seed=2)

    synthetic.main(["--out", str(tmp_path), "--train", "12", "--test", "5", "--seed", "2", "--collapsed"])
    rows = json.loads((tmp_path / "train.json").read_text())
    assert len(rows) == 12 and all(r["conversations"][-1]["value"].count("Action: Finish") == 1 for r in rows)
