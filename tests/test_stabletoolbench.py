"""Against the real thing: StableToolBench's virtual API server behind `server_env` and evaluate.py,
and StableToolBench's own judge (eval_pass_rate.py) on evaluate.py's output.

The server and the judge run from ../shared/stabletoolbench in their own virtual environment (tests/stb.py),
with the example cache of real responses for test queries 588, 608 and 1073. The judge's model is a
stand-in on 127.0.0.1 that answers "Solved". Run: pytest tests/test_stabletoolbench.py (~1 min, the
first run ~40 s more to build .stb-venv/)
"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import stb
from conftest import SHARED
from slm import toolbench
from slm.react import Episode, run_episodes
from slm.tool_env import server_env
from test_evaluate import QUERY, RUNAWAY, Script, evaluate, step, tiny_model  # noqa: F401  (tiny_model: a fixture)

QUERIES = SHARED / "toolbench/queries/stabletoolbench_solvable/test_instruction/G1_instruction.json"
TRAJECTORIES = SHARED / "toolbench/trajectories/stabletoolbench_example/virtual_chatgpt_dfs/G1_instruction"
CACHE = SHARED / "stabletoolbench/tool_response_cache_example"
IDS = (588, 608, 1073)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with stb.server(tmp_path_factory.mktemp("stb-server")) as url:
        yield url


@pytest.fixture(scope="module")
def queries():
    stb.require_shared()
    return {q["query_id"]: q for q in toolbench.read_queries(QUERIES) if q["query_id"] in IDS}


def recorded_calls(query_id: int):
    """(function, arguments as written, observation) of every call in the DFS tree of a recorded run."""
    def walk(node, action=None):
        if node.get("node_type") == "Action Input" and action is not None and action != "Finish":
            yield action, node["description"], node["observation"]
        for child in node.get("children", []):
            yield from walk(child, node["description"] if node.get("node_type") == "Action" else None)

    run = json.loads(next(TRAJECTORIES.glob(f"{query_id}_*.json")).read_text())
    return sorted(set(walk(run["tree"]["tree"])))   # branches of the search repeat their common calls


def cached_answer(query: dict, function: str, written: str):
    """The server cache's answer for this call, or None (the cache is keyed on str() of the arguments)."""
    api = next(a for a in query["api_list"] if toolbench.function_from_api(a)["name"] == function)
    path = (CACHE / api["category_name"] / f"{toolbench.standardize(api['tool_name'])}_for_{api['category_name']}"
            / f"{toolbench.change_name(toolbench.standardize(api['api_name']))}.json")
    cache = json.loads(path.read_text()) if path.is_file() else {}
    return cache.get(str(json.loads(written)))


def test_cached_observations_are_the_recorded_ones_byte_for_byte(url, queries):
    env = server_env(queries[588], url)
    checked = 0
    for function, written, observation in recorded_calls(588):
        answer = cached_answer(queries[588], function, written)
        try:
            recorded = json.loads(observation)
        except json.JSONDecodeError:   # cut at 1024 characters by the original run: not in the cache
            continue
        if answer != recorded:          # the same call answered differently in another recorded run
            continue
        result = env.call(function, json.loads(written), written)
        assert result.observation == observation, function
        assert result.outcome == "ok"
        checked += 1
    assert checked == 11   # of 14 distinct calls: 2 were cut at 1024 characters, 1 is cached with another answer


def test_failures_are_error_observations(url, queries, tmp_path):
    env = server_env(queries[588], url)
    miss = env.call("transfermarkt_search_for_theclique", {"name": "Nobody"}, '{"name": "Nobody"}')
    assert (miss.status, miss.outcome) == ("error", "server_error") and "status_code=500" in miss.error
    # A Python literal: our parser reads it, the server's json.loads does not.
    literal = env.call("transfermarkt_search_for_theclique", {"name": "Lionel Messi"}, "{'name': 'Lionel Messi'}")
    assert (literal.status, literal.outcome) == ("error", "tool_error")
    assert literal.error == "Tool input parse error...\n"

    with socket.socket() as stalled:   # accepts connections (the backlog) and never answers
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        slow = server_env(queries[588], f"http://127.0.0.1:{stalled.getsockname()[1]}/virtual", timeout=0.5)
        began = time.monotonic()
        timeout = slow.call("transfermarkt_search_for_theclique", {"name": "Lionel Messi"})
        assert time.monotonic() - began < 3
    assert (timeout.status, timeout.outcome) == ("error", "timeout") and "within 0.5 s" in timeout.error

    # A server killed between two steps: the refused call is retried, then answered with an error,
    # and the episode goes on to its Finish.
    with stb.server(tmp_path / "doomed") as doomed:
        process = stb.running[doomed]
        scripts = {queries[588]["query"]: [
            step("transfermarkt_search_for_theclique", {"name": "Lionel Messi"}),
            step("transfermarkt_search_for_theclique", {"name": "Lionel Messi"}),
            step("Finish", {"return_type": "give_answer", "final_answer": "Messi plays football."})]}

        class Killing(Script):
            def prompt(self, history):
                if len(history) == 4:          # system, user, the first call, its observation
                    stb.stop(process)
                return super().prompt(history)

        episode = Episode("G1_instruction", "588", queries[588]["query"],
                          toolbench.functions_from_api_list(queries[588]["api_list"]),
                          toolbench.conversation_start(queries[588], {}),
                          server_env(queries[588], doomed, backoff=0.1), [])
        run_episodes([episode], Killing(scripts), 10, "test")
    assert [s["outcome"] for s in episode.steps[:2]] == ["ok", "server_error"]
    assert "cannot be reached" in json.loads(episode.steps[1]["observation"])["error"]
    assert episode.outcome == "finished"


def scripted_runs(queries) -> dict[str, list]:
    """Each query's recorded final chain, replayed as model output, with a few failures added.

    588: its 3 cached calls (ok), a call the cache lacks (server_error), the first call again as a
    Python literal (tool_error), then Finish. 608: its 2 cached calls, an undeclared function, Finish.
    1073: its 2 cached calls, then a step that never ends (no Finish: the judge fails it unasked).
    """
    scripts = {}
    for query_id, query in queries.items():
        run = json.loads(next(TRAJECTORIES.glob(f"{query_id}_*.json")).read_text())
        calls = [m["function_call"] for m in run["answer_generation"]["train_messages"][-1]
                 if m["role"] == "assistant" and m.get("function_call")]
        texts = [toolbench.assistant_value("", c["name"], c["arguments"]) for c in calls]
        if query_id == 588:
            texts[-1:-1] = [step("transfermarkt_search_for_theclique", "{'name': 'Lionel Messi'}")]
        if query_id == 608:
            texts[-1:-1] = [step("weather_now", {"city": "Paris"})]
        if query_id == 1073:
            texts[-1] = RUNAWAY
        scripts[query["query"]] = texts
    return scripts


@pytest.fixture(scope="module")
def suite_run(url, queries, tiny_model, tmp_path_factory):  # noqa: F811  (tiny_model is the imported fixture)
    """evaluate.py's stabletoolbench suite through the server on 588/608/1073, the model's steps scripted."""
    out = tmp_path_factory.mktemp("suite")
    data = out / "G1_instruction.json"
    data.write_text(json.dumps(list(queries.values())))
    script = Script(scripted_runs(queries))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "Decoder", lambda *args, **kwargs: script)
        results = evaluate.main(["--model", str(tiny_model), "--suite", "stabletoolbench", "--data", str(data),
                                 "--tools", str(SHARED / "toolbench/tools/toolenv2404"), "--tool-server", url,
                                 "--toolbench-key", "SECRET-KEY-42", "--out", str(out / "eval")])
    return out / "eval", results


def test_suite_through_the_server_counts_calls(suite_run):
    out, results = suite_run
    assert results["overall"]["calls"] == {"ok": 7, "undeclared": 1, "tool_error": 1, "server_error": 1,
                                           "timeout": 0}
    assert results["overall"]["outcomes"] == {"finished": 2, "runaway": 1}
    records = {json.loads(line)["query_id"]: json.loads(line)
               for line in (out / "records/G1_instruction.jsonl").read_text().splitlines()}
    first = records["588"]["steps"][0]   # a real cached response, as StableToolBench's client words it
    assert first["observation"].startswith('{"error": "", "response": "Lionel Messi, born on June 24, 1987')
    written = [path.read_text() for path in out.rglob("*") if path.is_file() and path.suffix != ".png"]
    assert written and not any("SECRET-KEY-42" in text for text in written)


def test_suite_with_a_tiny_model_through_the_server(url, queries, tiny_model, tmp_path):  # noqa: F811
    data = tmp_path / "G1_instruction.json"
    data.write_text(json.dumps(list(queries.values())))
    results = evaluate.main(["--model", str(tiny_model), "--suite", "stabletoolbench", "--data", str(data),
                             "--tools", str(SHARED / "toolbench/tools/toolenv2404"), "--tool-server", url,
                             "--max-new-tokens", "8", "--out", str(tmp_path / "eval")])
    records = [json.loads(line) for line in (tmp_path / "eval/records/G1_instruction.jsonl").read_text().splitlines()]
    assert len(records) == results["overall"]["queries"] == 3
    assert sum(results["overall"]["calls"].values()) == sum(r["tool_calls"] for r in records)


def test_the_judge_reads_every_prediction(suite_run, queries, tmp_path):
    out, _ = suite_run
    with stb.StandInJudgeModel() as model:
        done = stb.run_judge(out, ["G1_instruction"], model.url, tmp_path / "judged", times=2)
    assert done.returncode == 0, done.stderr[-3000:]
    judged = json.loads((tmp_path / "judged/G1_instruction_predictions.json").read_text())
    assert sorted(judged, key=int) == ["588", "608", "1073"]
    # 588 and 608 end in Finish: asked (at least once per round: the judge retries failed requests)
    # and "Solved"; 1073 never finished: Unsolved, unasked.
    asked = [request["messages"][0]["content"] for request in model.requests]
    assert len(asked) >= 4 and {q["query_id"]: any(q["query"] in text for text in asked)
                                for q in queries.values()} == {588: True, 608: True, 1073: False}
    assert {q: v["is_solved"] for q, v in judged.items()} == {
        "588": {"0": "AnswerStatus.Solved", "1": "AnswerStatus.Solved"},
        "608": {"0": "AnswerStatus.Solved", "1": "AnswerStatus.Solved"},
        "1073": {"0": "AnswerStatus.Unsolved", "1": "AnswerStatus.Unsolved"}}
    assert "Solve rate: 66.7% Std: 0.0%" in done.stdout


def test_a_busy_server_is_asked_again_and_a_non_json_answer_is_an_error():
    """A stand-in server on 127.0.0.1: 503 (busy) then an answer; then an answer that is not JSON."""
    replies = [(503, b"busy"), (200, b'{"error": "", "response": "sunny"}'), (200, b"<html>oops</html>")]
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = replies.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as http:
        threading.Thread(target=http.serve_forever, daemon=True).start()
        env = server_env(QUERY, f"http://127.0.0.1:{http.server_address[1]}/virtual", key="K", backoff=0.01)
        busy_then_ok = env.call("search_for_weather", {"city": "Paris"}, '{"city": "Paris"}')
        not_json = env.call("search_for_weather", {"city": "Paris"}, '{"city": "Paris"}')
        http.shutdown()
    assert (busy_then_ok.outcome, busy_then_ok.observation) == ("ok", '{"error": "", "response": "sunny"}')
    assert not_json.outcome == "server_error" and "not JSON" in not_json.error
    assert bodies[0] == {"category": "Data", "tool_name": "weather", "api_name": "search",
                         "tool_input": '{"city": "Paris"}', "strip": "truncate", "toolbench_key": "K"}
