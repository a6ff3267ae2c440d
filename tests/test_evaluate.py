"""evaluate.py and slm/react.py: the ReAct loop and its metrics on scripted model outputs, the ToolEval
export against the real converted answers, and all three suites end to end on a tiny random model.

Scripted tests need no model: `Script` stands in for evaluate.Decoder and answers each prompt with
the next text written for its query. End-to-end tests read ../shared (skipped when it is absent).
Run: pytest tests/test_evaluate.py
"""

import json
import sys
from pathlib import Path

import pytest

import slm
from slm import react, step_grammar, toolbench
from slm.generate import generate
from slm.react import Episode, run_episodes
from slm.tool_env import MAX_OBSERVATION_CHARS, ToolEnv, recorded_env

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402  (a script at the repository root)

QUERIES = SHARED / "toolbench/queries/stabletoolbench_solvable/test_instruction"
TOOLS = SHARED / "toolbench/tools/toolenv2404"
REFERENCE = SHARED / "toolbench/eval_reference"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared data folder beside the repository")
    return path


def api(tool: str, name: str, required=(), optional=(), response=None) -> dict:
    def param(p):
        return {"name": p, "type": "STRING", "description": "", "default": ""}
    return {"category_name": "Data", "tool_name": tool, "api_name": name, "api_description": f"{name} things",
            "required_parameters": [param(p) for p in required],
            "optional_parameters": [param(p) for p in optional], "method": "GET",
            "template_response": response if response is not None else {"name": "str"}}


# Function names: search_for_weather, forecast_for_weather, history_for_weather.
QUERY = {"query": "What is the weather in Paris?", "query_id": 7,
         "api_list": [api("Weather", "search", ["city"], ["units"]), api("Weather", "forecast", ["city"]),
                      api("Weather", "history", ["city"], response="x" * 2000)],
         "relevant APIs": [["Weather", "search"], ["Weather", "forecast"]]}


def step(action: str, arguments, thought: str = "ok") -> str:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return f"\nThought: {thought}\nAction: {action}\nAction Input: {text}"


ANSWER = {"return_type": "give_answer", "final_answer": "Sunny, 21 C."}
RUNAWAY = object()   # marks an output that never reached </s>


class Script:
    """evaluate.Decoder's interface; each query's outputs are consumed in order, one per round."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts = {query: list(texts) for query, texts in scripts.items()}
        self.batch_size = 4
        self.seconds = self.new_tokens = self.calls = self.budget_redone = self.grammar_failed = 0   # reported

    def prompt(self, history):
        query = history[1]["value"].strip().removesuffix("Begin!").strip()
        return [query]                        # one "token": the loop only measures and forwards it

    def __call__(self, prompts):
        return [self.scripts[p[0]].pop(0) for p in prompts]

    def text(self, output):
        return ("\nThought: going on and on", False) if output is RUNAWAY else (output, True)


def episodes_for(scripts: dict[str, list], max_steps: int = 10):
    episodes = []
    for i, query_text in enumerate(scripts):
        query = {**QUERY, "query": query_text, "query_id": i}
        episodes.append(Episode(
            subset="toy", query_id=str(i), query=query_text,
            functions=toolbench.functions_from_api_list(query["api_list"]),
            history=toolbench.conversation_start(query, {}), env=recorded_env(query),
            relevant=evaluate._relevant_functions(query)))
    run_episodes(episodes, Script(scripts), max_steps, "test")
    return episodes


SCRIPTS = {
    "good": [step("search_for_weather", {"city": "Paris"}), step("Finish", ANSWER)],
    "hallucinated": [step("search_for_weather", {"city": "Paris"}), step("weather_now", {"city": "Paris"}),
                     step("Finish", ANSWER)],
    "bad arguments": [step("search_for_weather", {"town": "Paris"}), step("Finish", ANSWER)],
    "malformed": ["\nThought: I will call\nAction Input: {}"],
    "invalid json": [step("search_for_weather", '{"city": Paris')],
    "runaway": [RUNAWAY],
    "give up": [step("forecast_for_weather", {"city": "Paris"}),
                step("Finish", {"return_type": "give_up_and_restart"})],
    "loops": [step("history_for_weather", {"city": "Paris"})] * 3,
    "finish errors": [step("Finish", {"final_answer": "x"}), step("Finish", {"return_type": "give_answer"}),
                      step("Finish", {"return_type": "give_answer", "final_answer": " "})],
}


@pytest.fixture(scope="module")
def scripted():
    return {e.query: e for e in episodes_for(SCRIPTS, max_steps=3)}


def test_outcomes_and_reasons(scripted):
    outcomes = {query: (e.outcome, len(e.steps)) for query, e in scripted.items()}
    assert outcomes == {
        "good": ("finished", 2), "hallucinated": ("finished", 3), "bad arguments": ("finished", 2),
        "malformed": ("malformed_step", 1), "invalid json": ("malformed_step", 1), "runaway": ("runaway", 1),
        "give up": ("gave_up", 2), "loops": ("step_budget", 3), "finish errors": ("empty_answer", 3),
    }
    assert "no 'Action: '" in scripted["malformed"].detail
    assert "neither JSON nor a Python literal" in scripted["invalid json"].detail
    assert scripted["good"].final_answer == "Sunny, 21 C."
    assert [evaluate.offline_pass(e) for e in scripted.values()].count(True) == 1
    assert evaluate.offline_pass(scripted["good"])


def test_observations_follow_toolbench(scripted):
    calls = scripted["hallucinated"].steps
    assert json.loads(calls[0]["observation"]) == {"error": "", "response": '{"name":"str"}'}
    assert json.loads(calls[1]["observation"]) == {"error": "No such function name: weather_now", "response": ""}
    assert calls[1]["status"] == "undeclared"
    bad = scripted["bad arguments"].steps[0]
    assert bad["status"] == "error" and not bad["arguments_valid"]
    assert "missing required parameters ['city']" in json.loads(bad["observation"])["error"]
    long = scripted["loops"].steps[0]["observation"]
    assert len(long) == MAX_OBSERVATION_CHARS + 3 and long.endswith("...")
    errors = [s["observation"] for s in scripted["finish errors"].steps[:2]]
    assert errors == [react.FINISH_NO_RETURN_TYPE, react.FINISH_NO_ANSWER]
    # The history the next prompt is built from: assistant text, then the observation.
    history = scripted["good"].history
    assert [m["from"] for m in history] == ["system", "user", "assistant", "function", "assistant"]
    assert history[2]["value"] == SCRIPTS["good"][0]


def test_metrics(scripted):
    m = evaluate.episode_metrics(list(scripted.values()))
    assert m["queries"] == 9
    assert m["offline_pass_rate"] == pytest.approx(1 / 9)
    assert m["finish_rate"] == pytest.approx(3 / 9)          # good, hallucinated, bad arguments
    assert m["give_up_rate"] == pytest.approx(1 / 9)
    # 18 steps, 3 of them unparsed (malformed, invalid json, runaway).
    assert m["format_valid_rate"] == pytest.approx(15 / 18)
    assert m["hallucinated_function_rate"] == pytest.approx(1 / 15)
    # Tool calls to declared functions: 7 (good 1, hallucinated 1, bad arguments 1, give up 1, loops 3).
    assert m["argument_valid_rate"] == pytest.approx(6 / 7)
    # Relevant: search and forecast. Called (whatever the arguments) by good, hallucinated, bad
    # arguments (search) and give up (forecast): 1/2 each, the others 0.
    assert m["relevant_api_recall"] == pytest.approx(2 / 9)
    assert m["outcomes"]["malformed_step"] == 2
    # good 1 ok, hallucinated 1 ok + 1 undeclared, bad arguments 1 error, give up 1 ok, loops 3 ok.
    assert m["calls"] == {"ok": 6, "undeclared": 1, "tool_error": 1, "server_error": 0, "timeout": 0}


def test_calls_of_a_round_run_on_the_pool():
    """With workers, every episode's call still lands in its own episode, and the calls overlap."""
    import threading

    barrier = threading.Barrier(4, timeout=5)   # passes only if 4 calls are in flight at once

    def respond(name, arguments, text):
        barrier.wait()
        return json.dumps({"error": "", "response": text})

    scripts = {f"q{i}": [step("search_for_weather", {"city": f"c{i}"}), step("Finish", ANSWER)] for i in range(4)}
    functions = toolbench.functions_from_api_list(QUERY["api_list"])
    episodes = [Episode("toy", q, q, functions, toolbench.conversation_start({**QUERY, "query": q}, {}),
                        ToolEnv(functions, respond), []) for q in scripts]
    run_episodes(episodes, Script(scripts), 10, "test", workers=4)
    for e in episodes:
        assert e.outcome == "finished"
        assert json.loads(e.steps[0]["observation"])["response"] == json.dumps({"city": "c" + e.query[1:]})


def test_odd_model_output_never_crashes(tmp_path):
    episode = episodes_for({"odd": [step("search_for_weather", "{'city': {1, 2}}"),   # a set: Python, not JSON
                                    step("search_for_weather", "{1: 2}")]})[0]
    assert episode.steps[0]["status"] == "ok" and episode.outcome == "malformed_step"
    assert "non-string keys" in episode.detail
    # The set is written as its repr (default=repr), in the record and in the prediction.
    evaluate.write_jsonl(tmp_path / "r.jsonl", [evaluate.episode_record(episode)])
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["steps"][0]["arguments"] == {"city": "{1, 2}"} and record["outcome"] == "malformed_step"
    prediction = json.loads(json.dumps(evaluate.tooleval_prediction(episode)))
    tool_node = prediction["answer"]["answer_details"][0]["next"][0]["next"][0]["next"][0]
    assert tool_node["role"] == "tool" and json.loads(tool_node["message"]["arguments"]) == {"city": "{1, 2}"}
    # A tool implementation that raises becomes an error observation.
    env = ToolEnv([{"name": "f", "parameters": {}}], lambda name, arguments, text: 1 / 0)
    result = env.call("f", {})
    assert result.status == "error" and "ZeroDivisionError" in result.error


def _walk(node: dict):
    yield node
    for child in node["next"]:
        yield from _walk(child)


def test_export_matches_the_converted_answer_format(scripted):
    reference = json.loads(shared(REFERENCE / "stabletoolbench_example/model_predictions_converted"
                                  "/virtual_chatgpt_cot/G1_instruction.json").read_text())
    ours = {e.query_id: evaluate.tooleval_prediction(e) for e in scripted.values()}
    ours = json.loads(json.dumps(ours))   # what the file holds
    for expected, got in [(next(iter(reference.values())), p) for p in ours.values()]:
        assert set(got) == set(expected)
        assert set(got["answer"]) == set(expected["answer"])
        assert isinstance(got["answer"]["final_answer"], str) and isinstance(got["answer"]["total_steps"], int)
        assert got["available_tools"][-1]["name"] == "Finish"
        nodes = list(_walk(got["answer"]["answer_details"][0]))
        assert got["answer"]["total_steps"] == len(nodes)
        assert [n["role"] for n in nodes[:2]] == ["system", "user"]
        for node in nodes:
            assert set(node) == {"role", "message", "next"} and len(node["next"]) <= 1
            if node["role"] == "tool":
                assert set(node["message"]) == {"name", "arguments", "response"}
                json.loads(node["message"]["arguments"])
    # Same invariants hold in the real file, so our reading of the format is the file's.
    for item in reference.values():
        nodes = list(_walk(item["answer"]["answer_details"][0]))
        assert item["answer"]["total_steps"] == len(nodes)
        assert all(set(n["message"]) == {"name", "arguments", "response"} for n in nodes if n["role"] == "tool")
    # StableToolEval's first gate: the final tool step of a finished run is a Finish call.
    good = ours[scripted["good"].query_id]["answer"]
    last_tool = [n for n in _walk(good["answer_details"][0]) if n["role"] == "tool"][-1]
    assert "'name': 'Finish'" in str(last_tool["message"])
    assert json.loads(good["final_answer"]) == ANSWER


def test_an_episode_that_cannot_start_is_a_failed_prediction(tmp_path):
    class Full(Script):
        def prompt(self, history):
            if "too long" in history[1]["value"]:
                raise ValueError("the history does not fit")
            return super().prompt(history)

    scripts = {"too long": [], "good": SCRIPTS["good"]}
    episodes = [Episode("toy", str(i), q, toolbench.functions_from_api_list(QUERY["api_list"]),
                        toolbench.conversation_start({**QUERY, "query": q}, {}), recorded_env(QUERY), [])
                for i, q in enumerate(scripts)]
    run_episodes(episodes, Full(scripts), 10, "test")
    assert [e.outcome for e in episodes] == ["context_full", "finished"]
    evaluate.write_judge_input(tmp_path, "toy", episodes)
    predictions = json.loads((tmp_path / "predictions/toy.json").read_text())
    assert json.loads((tmp_path / "test_query_ids/toy.json").read_text()) == {"0": 0, "1": 0}
    assert set(predictions) == {"0", "1"}
    assert predictions["0"]["answer"]["total_steps"] == 2 and predictions["0"]["answer"]["final_answer"] == ""


def test_synthetic_gold_passes_and_wrong_answer_fails(tmp_path):
    from data import synthetic

    tasks = synthetic.make_tasks("test", 6, seed=0)
    outputs = {}
    for task in tasks:
        solution = task["solution"]
        gold = [step(name, arguments, thought) for thought, name, arguments in solution["steps"]]
        outputs[task["query"]] = gold + [step("Finish", {"return_type": "give_answer",
                                                         "final_answer": solution["final_answer"]})]
    outputs[tasks[0]["query"]][-1] = step("Finish", {"return_type": "give_answer", "final_answer": "no idea"})

    class TaskScript(Script):
        def prompt(self, history):
            return [history[1]["value"].removeprefix("\n").removesuffix("\nBegin!\n")]

    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(tasks))
    skipped = []
    episodes = evaluate.synthetic_episodes([path], None, False, skipped)
    assert [e.query_id for e in episodes] == [str(t["query_id"]) for t in tasks] and not skipped
    run_episodes(episodes, TaskScript(outputs), 10, "test")
    scores = evaluate.synthetic_scores(episodes)
    metrics = evaluate.synthetic_metrics(episodes, scores)
    assert metrics["pass_rate"] == pytest.approx(5 / 6)
    assert not scores[str(tasks[0]["query_id"])]["pass"]
    assert metrics["finish_rate"] == 1.0 and metrics["argument_valid_rate"] == 1.0
    assert sum(metrics["pass_rate_by_type"].values()) > 0


def test_replay_scoring():
    gold = toolbench.parse_step(step("search_for_weather", {"city": "Paris"}))
    item = {"source": "s", "id": "q", "turn": 2, "history": [], "gold": gold}
    same = evaluate._replay_record(item, 10, step("search_for_weather", {"city": "Paris"}, "other"), True, "")
    other_args = evaluate._replay_record(item, 10, step("search_for_weather", {"city": "Rome"}), True, "")
    broken = evaluate._replay_record(item, 10, "\nThought: hm", True, "")
    m = evaluate.replay_metrics([same, other_args, broken])
    assert (m["parse_rate"], m["action_accuracy"], m["argument_exact_match"], m["finish_accuracy"]) == \
        pytest.approx((2 / 3, 2 / 3, 1 / 3, 2 / 3))
    assert broken["error"].startswith("malformed_step")
    runaway = evaluate._replay_record(item, 10, step("search_for_weather", {"city": "Paris"}), False, "")
    assert not runaway["parsed"] and runaway["error"].startswith("runaway")
    finish = {**item, "gold": toolbench.parse_step(step("Finish", ANSWER))}
    right = evaluate._replay_record(finish, 10, step("Finish", {**ANSWER, "final_answer": "other"}), True, "")
    gave_up = evaluate._replay_record(finish, 10, step("Finish", {"return_type": "give_up_and_restart"}), True, "")
    assert right["finish_match"] and right["action_match"] and not right["arguments_match"]
    assert not gave_up["finish_match"] and gave_up["action_match"]


# ------------------------------------------------------------------------- end to end, tiny model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer OPT with OPT's real vocabulary and tokenizer, in Hugging Face's layout."""
    tokenizer = shared(SHARED / "opt")
    config = slm.OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False)
    model = slm.OPT(config)
    model.init_weights(seed=0)
    return slm.save_model(model, tmp_path_factory.mktemp("tiny"), tokenizer=tokenizer)


FAST = ["--max-new-tokens", "8", "--batch-size", "4"]


def test_stabletoolbench_end_to_end(tiny_model, tmp_path, capsys):
    files = [shared(QUERIES / "G1_instruction.json"), QUERIES / "G3_instruction.json"]
    results = evaluate.main(["--model", str(tiny_model), "--suite", "stabletoolbench", "--data", *map(str, files),
                             "--tools", str(shared(TOOLS)), "--limit", "2", "--out", str(tmp_path), *FAST])
    assert set(results["subsets"]) == {"G1_instruction", "G3_instruction"}
    assert "offline" in results["note"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["max_new_tokens"] == 8 and saved["timings"]["new_tokens"] > 0
    records = [json.loads(line) for subset in ("G1_instruction", "G3_instruction")
               for line in (tmp_path / f"records/{subset}.jsonl").read_text().splitlines()]
    assert len(records) == results["overall"]["queries"] == 4 and all(r["outcome"] for r in records)
    assert results["overall"]["offline_pass_rate"] == sum(r["offline_pass"] for r in records) / 4
    assert sum(results["overall"]["calls"].values()) == sum(r["tool_calls"] for r in records)
    for subset in ("G1_instruction", "G3_instruction"):   # what StableToolBench's judge reads
        predictions = json.loads((tmp_path / f"predictions/{subset}.json").read_text())
        ids = json.loads((tmp_path / f"test_query_ids/{subset}.json").read_text())
        assert len(predictions) == 2 and ids == {query_id: 0 for query_id in predictions}
        assert all("answer_details" in p["answer"] for p in predictions.values())
    assert (tmp_path / "pass_rate.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "offline pass" in out and "tool calls: ok" in out and "recorded environment" in out


def test_replay_end_to_end(tiny_model, tmp_path):
    files = [shared(SHARED / "toolbench/sft/toolllama_dfs_data_example.json"),
             SHARED / "toolbench/trajectories/toolbench_dfs/G1_answer/10_ChatGPT_DFS_woFilter_w2.json",
             REFERENCE / "toolbench_tooleval_default_evalset/gpt-3.5-turbo_CoT/G3_instruction.json"]
    results = evaluate.main(["--model", str(tiny_model), "--suite", "replay", "--data", *map(str, files),
                             "--tools", str(shared(TOOLS)), "--limit", "1",
                             "--out", str(tmp_path), *FAST])
    assert set(results["subsets"]) == {"toolllama_dfs_data_example", "G1_answer", "G3_instruction"}
    overall = results["overall"]
    assert overall["steps"] == sum(m["steps"] for m in results["subsets"].values()) > 0
    records = [json.loads(line) for path in (tmp_path / "records").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(records) == overall["steps"]
    for metric, key in (("parse_rate", "parsed"), ("action_accuracy", "action_match"),
                        ("argument_exact_match", "arguments_match"), ("finish_accuracy", "finish_match")):
        assert overall[metric] == pytest.approx(sum(r[key] for r in records) / len(records))
    record = json.loads((tmp_path / "records/G1_answer.jsonl").read_text().splitlines()[0])
    assert record["gold"]["action"] and record["prompt_tokens"] <= 2048 - 8


def test_synthetic_end_to_end(tiny_model, tmp_path):
    results = evaluate.main(["--model", str(tiny_model), "--suite", "synthetic", "--limit", "3",
                             "--out", str(tmp_path), *FAST])
    assert results["overall"]["queries"] == 3 and "pass_rate_by_type" in results["overall"]
    assert (tmp_path / "pass_rate.png").read_bytes().startswith(b"\x89PNG")
    record = json.loads((tmp_path / "records/synthetic.jsonl").read_text().splitlines()[0])
    assert "score" in record and "reasons" in record["score"]


def test_bad_inputs(tiny_model, tmp_path, capsys):
    bad = tmp_path / "G1_broken.json"
    good = json.loads(shared(QUERIES / "G1_tool.json").read_text())[0]
    bad.write_text(json.dumps([good, {**good, "relevant APIs": [["NoSuchTool", "x"]]}]))
    common = ["--model", str(tiny_model), "--suite", "stabletoolbench", "--data", str(bad),
              "--tools", str(shared(TOOLS)), "--out", str(tmp_path / "out"), "--max-steps", "1", *FAST]
    with pytest.raises(SystemExit, match=r"G1_broken.json: query 1 \(id .*\) is malformed.*NoSuchTool"):
        evaluate.main(common + ["--strict"])
    results = evaluate.main(common)
    assert results["overall"]["queries"] == 1 and len(results["skipped"]) == 1
    # A query without api_list is named (file, position, id, what is missing), counted and skipped.
    bad.write_text(json.dumps([good, {"query": "no api list", "query_id": 77}, good]))
    results = evaluate.main(common)
    assert results["overall"]["queries"] == 2
    assert results["skipped"] == [f"{bad}: query 1 (id 77) is malformed: it has no 'api_list'"]
    assert "skipped 1 malformed input item(s)" in capsys.readouterr().out
    # A file that is not a list of queries stops the run: nothing in it can be read.
    bad.write_text(json.dumps({"query": "not a list"}))
    with pytest.raises(SystemExit, match=r"G1_broken.json: cannot read it as a list of queries"):
        evaluate.main(common)
    # The synthetic suite's tasks likewise.
    task_file = tmp_path / "tasks.json"
    from data import synthetic
    tasks = synthetic.make_tasks("test", 2, 0)
    task_file.write_text(json.dumps([tasks[0], {k: v for k, v in tasks[1].items() if k != "api_list"}]))
    results = evaluate.main(["--model", str(tiny_model), "--suite", "synthetic", "--data", str(task_file),
                             "--out", str(tmp_path / "syn"), "--max-steps", "1", *FAST])
    assert results["overall"]["queries"] == 1 and "task 1 (id " in results["skipped"][0]
    assert "it has no 'api_list'" in results["skipped"][0]
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--suite", "synthetic", "--tool-server", "http://127.0.0.1:9/virtual"])
    assert "--tool-server serves the stabletoolbench suite only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--suite", "synthetic", "--no-such-flag"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--suite", "stabletoolbench", "--data", "x.json"])  # no --tools


def test_decoder_keeps_prompt_order(tiny_model):
    """Length-sorted chunks must hand every output back to its own prompt."""
    model = slm.load_model(tiny_model)
    tok = slm.load_tokenizer(tiny_model)
    decoder = evaluate.Decoder(model, tok, max_len=64, max_new_tokens=4, batch_size=2)
    prompts = [tok.encode(t) for t in ["a b c d e f", "x", "hello there", "one two three four"]]
    alone = [generate(model, [p], 4)[0] for p in prompts]
    assert decoder(prompts) == alone
    assert decoder.calls == 2 and decoder.new_tokens == sum(map(len, alone))


def test_untrained_model_constrained_parses_every_step(tiny_model, tmp_path):
    """Under --constrained even an untrained model writes steps that parse and name declared functions."""
    results = evaluate.main(["--model", str(tiny_model), "--suite", "synthetic", "--limit", "3", "--constrained",
                             "--max-steps", "2", "--max-new-tokens", "160", "--batch-size", "4",
                             "--out", str(tmp_path)])
    assert results["decoding"].startswith("constrained")
    assert results["budget_redone"] > 0   # an untrained model's thought runs on: its steps end under the budget
    records = [json.loads(line) for line in (tmp_path / "records/synthetic.jsonl").read_text().splitlines()]
    assert records and not [r["outcome"] for r in records if r["outcome"] in ("malformed_step", "runaway")]
    assert results["overall"]["format_valid_rate"] == 1.0
    assert results["overall"]["hallucinated_function_rate"] == 0.0


def test_a_grammar_llguidance_gives_up_on_is_counted_and_decodes_free(tiny_model, monkeypatch, capsys):
    """A matcher in llguidance's error state (its lexer limits, say) leaves its row free, and the results count it."""
    model = slm.load_model(tiny_model)
    tok = slm.load_tokenizer(tiny_model)
    grammar = step_grammar.for_tokenizer(tok)
    make = type(grammar).matcher

    def failing(self, *args, **kwargs):
        matcher = make(self, *args, **kwargs)
        matcher._matcher.consume_token(tok.encode("Hello", add_bos=False)[0])   # not "\nThought: ": an error
        return matcher

    monkeypatch.setattr(type(grammar), "matcher", failing)
    decoder = evaluate.Decoder(model, tok, max_len=64, max_new_tokens=6, batch_size=2, constrained=True)
    prompts = [evaluate.GrammarPrompt(tok.encode(t), functions=[]) for t in ["a b c", "x y"]]
    assert decoder(prompts) == [generate(model, [p], 6)[0] for p in prompts]   # as if unconstrained
    assert decoder.grammar_failed == len(prompts) + decoder.budget_redone   # each decoding of each row
    assert "the step grammar failed" in capsys.readouterr().err
