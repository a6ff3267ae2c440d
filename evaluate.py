"""Evaluate a model on ToolBench tool calling: offline metrics, and the input of StableToolBench's judge.

    python evaluate.py --model runs/paper/final --suite stabletoolbench \
        --data ../shared/toolbench/queries/stabletoolbench_solvable/test_instruction/*.json \
        --tools ../shared/toolbench/tools/toolenv2404 --out eval/paper \
        [--tool-server http://127.0.0.1:8080/virtual]    # StableToolBench's virtual API server
    python evaluate.py --model runs/paper/final --suite replay \
        --data ../shared/toolbench/sft/toolllama_dfs_data_example.json \
               ../shared/toolbench/trajectories/toolbench_dfs/G1_answer/*.json
    python evaluate.py --model runs/smoke/final --suite synthetic      # 200 in-memory test tasks
    python evaluate.py --model runs/paper/final --suite bfcl [--bfcl-categories non_live live | CAT ...]

Suites
------
stabletoolbench  Each test query runs the greedy ReAct loop of `slm/react.py` for at most --max-steps
                 (10) steps. The prompt is the training rendering of the conversation so far
                 (`toolbench.prompt_ids`, the same fitting), a step is parsed with `toolbench.parse_step`,
                 and `Finish` ends the episode. A tool call is answered by `slm/tool_env.py`: offline, the
                 API's recorded response template; with --tool-server, StableToolBench's virtual API
                 server (real cached responses, then its LLM simulator), --tool-workers calls at a time.
                 All running episodes decode together: each round, one batched `slm.generate` over their
                 prompts (in chunks of --batch-size).
synthetic        The same loop over data/synthetic.py's test tasks, whose tools really run
                 (`synthetic.execute`); `synthetic.score` judges each answer exactly.
replay           Gold trajectories (ToolLLaMA rows, DFS answer files, ToolEval converted answers):
                 every assistant step is predicted from the recorded history and compared with gold.
bfcl             The same loop over BFCL's questions (slm/bfcl.py): every non-Finish action is recorded
                 and answered with the fixed observation {"error": "", "response": "ok"} until Finish,
                 a step that does not parse, or --max-steps (at least 9). The calls are scored by
                 bfcl_eval's own checker: bfcl_predictions.jsonl, result/ (BFCL's result files),
                 score/ and bfcl_scores.json (Non-Live AST, Live AST, Irrelevance, Relevance).

Metrics (per subset = query file, and `overall` pooled over all queries, i.e. query-weighted)
-------
offline_pass_rate   finished with an answer, at least one relevant API called successfully, and no
                    undeclared function called. It is an *offline* gate, not the ToolBench pass rate,
                    which needs an LLM judge: run ToolEval / StableToolEval on predictions/<subset>.json.
finish_rate         Finish with return_type give_answer and a non-empty final_answer within the budget.
format_valid_rate   generated steps that parse as Thought / Action / Action Input (per step).
hallucinated_function_rate  parsed steps whose action is not a declared function (per step).
argument_valid_rate calls to declared tools with every required and no undeclared parameter.
relevant_api_recall share of the query's `relevant APIs` called at least once (mean over queries).
pass_rate           (synthetic) final answer holds the right value(s) and every call was valid.
calls               tool calls by outcome: ok, undeclared, tool_error (the answer carries an error),
                    server_error (no usable answer from --tool-server), timeout.
replay: parse_rate, action_accuracy, argument_exact_match (same action, JSON-equal arguments),
        finish_accuracy (the Finish decision and its return_type agree with gold).

Episode outcomes (finished, gave_up, malformed_step, runaway, context_full, ...) are slm/react.py's.

Output in --out: results.json (metrics, config, model, commit, timings; never the toolbench key),
records/<subset>.jsonl (one line per query or step, with the reason of each failure), pass_rate.png,
a table on stdout, and for the stabletoolbench suite StableToolBench's judge input:
predictions/<subset>.json (ToolEval's converted-answer format, one per query read, a query that
could not start included) and test_query_ids/<subset>.json. From a StableToolBench checkout, with OUT
an absolute path and pool.json holding [{"api_key": "...", "api_base": "https://api.openai.com/v1"}]:

    cd StableToolBench/toolbench/tooleval && mkdir -p OUT/judged && \\
    API_POOL_FILE=pool.json python eval_pass_rate.py --converted_answer_path OUT \\
        --save_path OUT/judged --reference_model predictions --test_ids OUT/test_query_ids \\
        --test_set G1_instruction --evaluate_times 3
"""

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import slm
from slm import bfcl, kernels, step_grammar, toolbench
from slm.generate import generate
from slm.plots import plot_pass_rate
from slm.provenance import git_commit
from slm.react import Episode, run_episodes
from slm.tokenizer import EOS_ID
from slm.toolbench import FINISH
from slm.tool_env import OUTCOMES, ToolEnv, recorded_env, server_env
from slm.weights import resolve_checkpoint

REPO = Path(__file__).resolve().parent
SYNTHETIC_TEST_TASKS, SYNTHETIC_SEED = 200, 0   # data/synthetic.py's defaults for its test split


# ============================================================================ command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Offline ToolBench evaluation (offline pass rate, step metrics, replay, synthetic).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="Hugging Face OPT checkpoint directory or hub id")
    parser.add_argument("--suite", required=True, choices=("stabletoolbench", "replay", "synthetic", "bfcl"),
                        help="what to evaluate (see below)")
    parser.add_argument("--data", nargs="+", type=Path, default=None,
                        help="stabletoolbench: query files (subset = file name, e.g. G1_instruction.json); "
                             "replay: ToolLLaMA row files, DFS answer files or ToolEval converted answers; "
                             "synthetic: test/synthetic.json written by data/synthetic.py "
                             f"(default: {SYNTHETIC_TEST_TASKS} test tasks generated with seed {SYNTHETIC_SEED})")
    parser.add_argument("--tools", type=Path, default=None,
                        help="tool directory for tool descriptions, e.g. ../shared/toolbench/tools/toolenv2404 "
                             "(required by stabletoolbench; used by replay for ToolEval answers)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory with vocab.json + merges.txt (default: the model directory)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N queries / trajectories / tasks of each file")
    parser.add_argument("--strict", dest="skip_bad", action="store_false",
                        help="stop at the first malformed input item (default: name it, count it, skip it)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: eval-<suite>)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="tokens per generated step (default 256; ToolLLaMA used 512). The prompt is "
                             "fitted to leave this many positions free")
    parser.add_argument("--constrained", action="store_true",
                        help="decode every step under slm.step_grammar (tool choice auto: a declared function "
                             "or Finish, schema-valid arguments; a step with no end within --max-new-tokens is "
                             "decoded again, its thought one line and its values bounded to a quarter of that in "
                             "characters); results.json's 'decoding', 'budget_redone' and 'grammar_failed' record it")
    parser.add_argument("--max-steps", type=int, default=10,
                        help="assistant steps (tool calls, Finish included) per episode (default 10, as ToolEval)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="context length the prompt plus the step must fit (default: the model's positions)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    kernels.add_arguments(parser, "attention sdpa, layer_norm torch")
    parser.add_argument("--bfcl-categories", nargs="+", default=["non_live", "live"], metavar="CAT",
                        help="bfcl suite: non_live, live and/or category names (default: non_live live)")
    parser.add_argument("--tool-server", default=None, metavar="URL",
                        help="stabletoolbench: send tool calls to this StableToolBench virtual API server, e.g. "
                             "http://127.0.0.1:8080/virtual (default: the offline recorded environment)")
    parser.add_argument("--toolbench-key", default=None,
                        help="the server's toolbench_key (default: the TOOLBENCH_KEY variable); never written out")
    parser.add_argument("--tool-timeout", type=float, default=30.0, help="seconds a tool call may take (default 30)")
    parser.add_argument("--tool-workers", type=int, default=8,
                        help="tool calls of one decoding round sent to the server at once (default 8)")
    args = parser.parse_args(argv)
    if args.suite in ("stabletoolbench", "replay") and not args.data:
        parser.error(f"--suite {args.suite} needs --data FILE...")
    if args.suite == "stabletoolbench" and args.tools is None:
        parser.error("--suite stabletoolbench needs --tools DIR (the tool descriptions of the system prompt)")
    if args.tool_server and args.suite != "stabletoolbench":
        parser.error("--tool-server serves the stabletoolbench suite only")
    for name in ("batch_size", "max_new_tokens", "max_steps", "tool_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.suite == "bfcl" and args.max_steps < 9:
        parser.error(f"--suite bfcl needs --max-steps of at least 9 (parallel questions need up to 8 calls), "
                     f"got {args.max_steps}")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.out = args.out or Path(f"eval-{args.suite}")
    return args


class InputError(ValueError):
    """A malformed input item: the message names the file, the item and what was expected."""


# ============================================================================ decoding

class GrammarPrompt(list):
    """A prompt's token ids with the functions (Finish aside) that its step grammar allows."""

    def __init__(self, tokens: list[int], functions: list[dict]):
        super().__init__(tokens)
        self.functions = functions


@dataclass
class Decoder:
    """slm.generate over many prompts in length-sorted chunks, with the counters for the timings."""

    model: slm.OPT
    tok: slm.Tokenizer
    max_len: int
    max_new_tokens: int
    batch_size: int
    constrained: bool = False
    seconds: float = 0.0
    new_tokens: int = 0
    calls: int = 0
    budget_redone: int = 0
    grammar_failed: int = 0

    def prompt(self, history: list[dict]) -> list[int]:
        """Training's rendering and fitting of `history`, leaving room for one step (ValueError if it can't).

        Constrained, the prompt also carries the functions its system message declares (`GrammarPrompt`)."""
        tokens = toolbench.prompt_ids(history, self.tok, self.max_len, reserve=self.max_new_tokens)
        if not self.constrained:
            return tokens
        functions = toolbench.split_system(history[0]["value"])[1]
        return GrammarPrompt(tokens, functions=[f for f in functions if f["name"] != FINISH])

    def _constraints(self, prompts: list[list[int]], budget: bool = False) -> list | None:
        """One matcher per GrammarPrompt (tool choice auto). Unbounded, the grammar forbids only malformed
        steps; `budget` bounds the thought (one line) and each value to a quarter of the token limit in
        characters, so that the step ends within it (cutting what is longer, a long Finish answer say)."""
        if not self.constrained:
            return None
        grammar = step_grammar.for_tokenizer(self.tok)
        # Under the budget, ToolBench's "integer" stays an integer: a number's fraction has no length bound.
        bounds = {"thought_chars": self.max_new_tokens // 4, "value_chars": self.max_new_tokens // 4} if budget \
            else {"toolbench_types": True}
        return [grammar.matcher(p.functions, **bounds) if isinstance(p, GrammarPrompt) else None for p in prompts]

    def _generate(self, batch: list[list[int]], budget: bool = False) -> list[list[int]]:
        matchers = self._constraints(batch, budget)
        outputs = generate(self.model, batch, self.max_new_tokens, eos_id=EOS_ID, constraints=matchers)
        if not self.constrained:
            return outputs
        for matcher in matchers:
            if matcher is not None and matcher.failed:   # the row went on unconstrained
                self.grammar_failed += 1
                print(f"evaluate: the step grammar failed, the step was decoded unconstrained: "
                      f"{matcher.error.splitlines()[0] if matcher.error else ''}", file=sys.stderr)
        if not budget:
            # A constrained step that found no end within the limit is decoded again under the budget grammar:
            # steps that fit are never cut.
            redo = [i for i, tokens in enumerate(outputs)
                    if EOS_ID not in tokens and isinstance(batch[i], GrammarPrompt)]
            if redo:
                for i, tokens in zip(redo, self._generate([batch[i] for i in redo], budget=True)):
                    outputs[i] = tokens
                self.budget_redone += len(redo)
        return outputs

    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        # Similar lengths share a chunk, so little of each batch is padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            began = time.perf_counter()
            for i, tokens in zip(chunk, self._generate([prompts[i] for i in chunk])):
                outputs[i] = tokens
            self.seconds += time.perf_counter() - began
            self.new_tokens += sum(len(outputs[i]) for i in chunk)
            self.calls += 1
        return outputs

    def text(self, tokens: list[int]) -> tuple[str, bool]:
        """(the step text without </s>, whether it stopped at </s>)."""
        stopped = bool(tokens) and tokens[-1] == EOS_ID
        return self.tok.decode(tokens[:-1] if stopped else tokens), stopped


# ============================================================================ inputs

def _subset_of(path: Path) -> str:
    return path.stem


def _relevant_functions(query: dict) -> list[str]:
    """Function names of the query's `relevant APIs` ([tool_name, api_name] pairs of its api_list)."""
    by_pair = {(api["tool_name"], api["api_name"]): toolbench.function_from_api(api)["name"]
               for api in query["api_list"]}
    missing = [pair for pair in map(tuple, query["relevant APIs"]) if pair not in by_pair]
    if missing:
        raise ValueError(f"relevant APIs {missing} are not in its api_list")
    return [by_pair[tuple(pair)] for pair in query["relevant APIs"]]


def _read_queries(path: Path) -> list[dict]:
    try:
        return toolbench.read_queries(path)
    except (OSError, ValueError) as err:   # JSONDecodeError is a ValueError
        raise InputError(f"{path}: cannot read it as a list of queries ({err})") from err


def _bad_item(message: str, err: Exception | None, skip_bad: bool, skipped: list) -> None:
    """Count a malformed input item and go on, or (--strict) stop; the message says what is missing."""
    if isinstance(err, KeyError):
        message += f": it has no {err}"
    elif err is not None:
        message += f": {type(err).__name__}: {err}"
    if not skip_bad:
        raise InputError(message + " (without --strict such items are skipped)") from err
    skipped.append(message)


def _id_of(item) -> str:
    return repr(item.get("query_id", item.get("id"))) if isinstance(item, dict) else "none"


def stabletoolbench_episodes(paths, tools_dir: Path, limit, skip_bad, skipped, make_env=recorded_env) -> list[Episode]:
    """One episode per query; `make_env(query)` gives its tools (recorded templates, or a tool server)."""
    if not tools_dir.is_dir():
        raise InputError(f"--tools {tools_dir} is not a directory (expected <Category>/<tool>.json files)")
    tools = toolbench.tool_index(tools_dir)
    episodes = []
    for path in paths:
        for index, query in enumerate(_read_queries(path)[:limit]):
            try:
                if not isinstance(query["query"], str) or not isinstance(query["api_list"], list):
                    raise ValueError("expected an object with a string 'query' and an 'api_list' list")
                episodes.append(Episode(
                    subset=_subset_of(path), query_id=str(query["query_id"]), query=query["query"],
                    functions=toolbench.functions_from_api_list(query["api_list"]),
                    history=toolbench.conversation_start(query, tools), env=make_env(query),
                    relevant=_relevant_functions(query)))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                _bad_item(f"{path}: query {index} (id {_id_of(query)}) is malformed", err, skip_bad, skipped)
    return episodes


def synthetic_episodes(paths, limit, skip_bad, skipped) -> list[Episode]:
    from data import synthetic  # the synthetic tasks live beside the data tools, not in slm/

    sources = [(path, _read_queries(path)) for path in paths] if paths else [
        (Path("synthetic.json"), synthetic.make_tasks("test", SYNTHETIC_TEST_TASKS, SYNTHETIC_SEED))]
    episodes = []
    for path, tasks in sources:
        for index, task in enumerate(tasks[:limit]):
            try:
                functions = toolbench.functions_from_api_list(task["api_list"])
                history = toolbench.opening(toolbench.system_prompt(functions, task["tool_descriptions"]),
                                            task["query"])
                env = ToolEnv(functions,
                              lambda name, arguments, text, task=task: synthetic.execute(task, name, arguments))
                episodes.append(Episode(
                    subset=_subset_of(path), query_id=str(task["query_id"]), query=task["query"],
                    functions=functions, history=history, env=env, relevant=_relevant_functions(task),
                    task=task))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                _bad_item(f"{path}: task {index} (id {_id_of(task)}) is malformed", err, skip_bad, skipped)
    return episodes


def bfcl_episodes(categories, limit, skip_bad, skipped) -> list[Episode]:
    """One episode per BFCL question; every non-Finish action is answered with bfcl.OBSERVATION."""
    episodes = []
    for category in categories:
        for index, entry in enumerate(bfcl.load_entries(category)[:limit]):
            try:
                functions = bfcl.functions_for(entry)
                episodes.append(Episode(
                    subset=category, query_id=str(entry["id"]), query=bfcl.user_query(entry), functions=functions,
                    history=bfcl.conversation(entry), env=bfcl.FixedEnv(functions), relevant=[]))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                _bad_item(f"BFCL {category}: question {index} (id {_id_of(entry)}) is malformed", err,
                          skip_bad, skipped)
    return episodes


def bfcl_prediction(e: Episode) -> dict:
    """bfcl_predictions.jsonl's line: the calls of the steps up to Finish, a broken or a runaway step."""
    texts = []
    for step in e.steps:
        if step.get("status") == "runaway":
            break
        texts.append(step["text"])
    return {"id": e.query_id, "category": e.subset, "calls": bfcl.calls_from_steps(texts), "outcome": e.outcome,
            "steps": e.steps, "prompt_tokens": e.prompt_tokens}


def run_bfcl(args, decoder: Decoder, skipped: list) -> tuple[dict, dict]:
    """Run BFCL's questions, write bfcl_predictions.jsonl, BFCL's result files and bfcl_scores.json,
    score them with bfcl_eval's checker; the metrics per category and the leaderboard's columns."""
    try:
        categories = bfcl.categories_of(args.bfcl_categories)
    except ValueError as err:
        raise InputError(str(err)) from None
    episodes = bfcl_episodes(categories, args.limit, args.skip_bad, skipped)
    run_episodes(episodes, decoder, args.max_steps, args.suite)
    records = [bfcl_prediction(e) for e in episodes]
    write_jsonl(args.out / "bfcl_predictions.jsonl", records)
    scores = bfcl.score(records, args.out, partial=args.limit is not None)
    (args.out / "bfcl_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    subsets = {}
    for category, es in _by(lambda e: e.subset, episodes).items():
        subsets[category] = scores["categories"][category] | {
            "queries": len(es),
            "not_fitting": sum(e.outcome == "context_full" and not e.steps for e in es),
            "unparsable_steps": sum(s.get("status") == "malformed" for e in es for s in e.steps),
        }
    return subsets, scores


# ============================================================================ episode metrics

def _rate(numerator: float, denominator: float):
    return numerator / denominator if denominator else None


def offline_pass(episode: Episode) -> bool:
    calls = [s for s in episode.steps if s.get("action") not in (None, FINISH)]
    relevant_ok = any(s["status"] == "ok" and s["action"] in episode.relevant for s in calls)
    hallucinated = any(s["status"] == "undeclared" for s in calls)
    return episode.outcome == "finished" and relevant_ok and not hallucinated


def episode_metrics(episodes: list[Episode]) -> dict:
    steps = [s for e in episodes for s in e.steps]
    parsed = [s for s in steps if "action" in s]
    calls = [s for s in parsed if s["action"] != FINISH]
    checked = [s for s in calls if "arguments_valid" in s]
    recalls = [len(set(e.relevant) & {s["action"] for s in e.steps if "action" in s}) / len(set(e.relevant))
               for e in episodes if e.relevant]
    n = len(episodes)
    return {
        "queries": n,
        "offline_pass_rate": _rate(sum(map(offline_pass, episodes)), n),
        "finish_rate": _rate(sum(e.outcome == "finished" for e in episodes), n),
        "give_up_rate": _rate(sum(e.outcome == "gave_up" for e in episodes), n),
        "format_valid_rate": _rate(len(parsed), len(steps)),
        "hallucinated_function_rate": _rate(sum(s["status"] == "undeclared" for s in parsed), len(parsed)),
        "argument_valid_rate": _rate(sum(s["arguments_valid"] for s in checked), len(checked)),
        "relevant_api_recall": _rate(sum(recalls), len(recalls)),
        "mean_steps": _rate(len(steps), n),
        "mean_tool_calls": _rate(len(calls), n),
        "calls": {outcome: sum(s["outcome"] == outcome for s in calls) for outcome in OUTCOMES},
        "outcomes": dict(Counter(e.outcome for e in episodes).most_common()),
    }


def synthetic_scores(episodes: list[Episode]) -> dict[str, dict]:
    """data/synthetic.py's exact verdict for every episode, keyed by query id."""
    from data import synthetic

    scores = {}
    for e in episodes:
        calls = [(s["action"], s["arguments"], s.get("observation", "")) for s in e.steps
                 if s.get("action") not in (None, FINISH)]
        try:
            scores[e.query_id] = synthetic.score(e.task, calls, e.final_answer)
        except Exception as err:  # whatever the model wrote, the run goes on; the episode fails
            scores[e.query_id] = {"pass": False, "answer_ok": False, "calls_ok": False, "missing": [],
                                  "invalid_calls": [], "reasons": [f"scoring raised {type(err).__name__}: {err}"]}
    return scores


def synthetic_metrics(episodes: list[Episode], scores: dict[str, dict]) -> dict:
    metrics = episode_metrics(episodes)
    verdicts = [(e.task["task_type"], scores[e.query_id]) for e in episodes]
    metrics["pass_rate"] = _rate(sum(v["pass"] for _, v in verdicts), len(verdicts))
    metrics["answer_correct_rate"] = _rate(sum(v["answer_ok"] for _, v in verdicts), len(verdicts))
    metrics["pass_rate_by_type"] = {
        kind: _rate(sum(v["pass"] for k, v in verdicts if k == kind), sum(k == kind for k, _ in verdicts))
        for kind in sorted({k for k, _ in verdicts})}
    return metrics


def episode_record(e: Episode) -> dict:
    return {"query_id": e.query_id, "subset": e.subset, "query": e.query, "prompt_tokens": e.prompt_tokens,
            "steps": e.steps, "tool_calls": sum(s.get("action") not in (None, FINISH) for s in e.steps),
            "outcome": e.outcome, "reason": e.detail, "final_answer": e.final_answer,
            "offline_pass": offline_pass(e)}


def tooleval_prediction(e: Episode) -> dict:
    """One query in ToolEval's converted-answer format (StableToolBench's convert_to_answer_format).

    answer_details is one chain: system -> user -> (assistant thought ->) tool call -> ... A tool node's
    message is {name, arguments (JSON text), response (the observation; "" for Finish)}; a step that
    did not parse appears as an assistant node with its raw text. total_steps counts the nodes.
    """
    nodes = [{"role": "system", "message": ""}, {"role": "user", "message": e.query}]
    for step in e.steps:
        if "action" not in step:
            nodes.append({"role": "assistant", "message": step["text"]})
            continue
        if step["thought"].strip():
            nodes.append({"role": "assistant", "message": step["thought"]})
        nodes.append({"role": "tool", "message": {
            "name": step["action"],
            "arguments": json.dumps(step["arguments"], ensure_ascii=False, indent=2, default=repr),
            "response": step.get("observation", "") if step["action"] != FINISH else ""}})
    chain: list[dict] = []
    for node in reversed(nodes):
        chain = [{**node, "next": chain}]
    return {"query": e.query, "available_tools": e.functions,
            "answer": {"method": "CoT@1", "total_steps": len(nodes), "final_answer": e.finish_arguments,
                       "answer_details": chain}}


def write_judge_input(out: Path, subset: str, episodes: list[Episode]) -> None:
    """predictions/<subset>.json and test_query_ids/<subset>.json, as StableToolBench's judge reads them.

    Every episode has a prediction, those that could not start (context_full) included, and the ids
    file lists the same queries: the judge counts only queries that have both, so its denominator is
    the whole subset.
    """
    predictions = {e.query_id: tooleval_prediction(e) for e in episodes}
    for folder, content in (("predictions", predictions), ("test_query_ids", {e.query_id: 0 for e in episodes})):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / f"{subset}.json").write_text(
            json.dumps(content, ensure_ascii=False, indent=2, default=repr), encoding="utf-8")


# ============================================================================ replay

def replay_items(paths, tools_dir, limit, skip_bad, skipped) -> list[dict]:
    """Every assistant step of every gold trajectory: {source, id, turn, history, gold (Step)}."""
    tools = toolbench.tool_index(tools_dir) if tools_dir else None
    items = []
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        fmt = toolbench.detect_format(path)
        source = path.parent.name if fmt == "dfs" else path.stem   # DFS answers come one file per query
        rows = []
        for index, row in enumerate(toolbench.read_rows(path, fmt, tools)):
            if isinstance(row, toolbench.Malformed):
                where = row.where if row.where.startswith(str(path)) else f"{path}: {row.where}"
                _bad_item(f"malformed item, {where}", None, skip_bad, skipped)
                continue
            try:
                rows.append(toolbench.check_row(row))
            except toolbench.BadRow as err:
                _bad_item(f"{path}: row {index} (id {_id_of(row)}) is malformed", err, skip_bad, skipped)
        # Step-exploded rows repeat their trajectory's prefix: collapse them so each step counts once.
        for chain in list(toolbench.chains(rows, collapse=True))[:limit]:
            for turn, message in enumerate(chain.conversations):
                if message["from"] != "assistant":
                    continue
                try:
                    gold = toolbench.parse_step(message["value"])
                except toolbench.ParseError as err:
                    skipped.append(f"{path}: {chain.id[:60]!r} turn {turn}: gold step does not parse ({err})")
                    continue
                items.append({"source": source, "id": chain.id, "turn": turn,
                              "history": chain.conversations[:turn], "gold": gold})
    return items


def run_replay(items: list[dict], decoder: Decoder) -> list[dict]:
    records, prompts, kept = [], [], []
    for item in items:
        try:
            prompts.append(decoder.prompt(item["history"]))
            kept.append(item)
        except ValueError as err:
            records.append(_replay_record(item, None, "", False, f"context_full: {err}"))
    bar = tqdm(total=len(kept), desc="replay", unit="step", dynamic_ncols=True)
    for start in range(0, len(kept), decoder.batch_size * 8):   # several batches per progress update
        chunk = slice(start, start + decoder.batch_size * 8)
        for item, prompt, tokens in zip(kept[chunk], prompts[chunk], decoder(prompts[chunk])):
            text, stopped = decoder.text(tokens)
            records.append(_replay_record(item, len(prompt), text, stopped, ""))
        bar.update(len(kept[chunk]))
    bar.close()
    return records


def _replay_record(item: dict, prompt_tokens, text: str, stopped: bool, error: str) -> dict:
    """One replayed step against its gold; a step that never reached </s> counts as unparsed, as in the loop."""
    gold, predicted = item["gold"], None
    if not error and not stopped:
        error = "runaway: no </s> within the step's token limit"
    if not error:
        try:
            predicted = toolbench.parse_step(text)
        except toolbench.ParseError as err:
            error = f"malformed_step: {err}"
    action_ok = predicted is not None and predicted.action == gold.action
    if predicted is None:
        finish_ok = False
    elif gold.action == FINISH:
        finish_ok = action_ok and predicted.action_input.get("return_type") == gold.action_input.get("return_type")
    else:
        finish_ok = predicted.action != FINISH
    return {"source": item["source"], "id": item["id"], "turn": item["turn"], "prompt_tokens": prompt_tokens,
            "gold": {"action": gold.action, "arguments": gold.action_input}, "text": text,
            "predicted": predicted and {"action": predicted.action, "arguments": predicted.action_input},
            "parsed": predicted is not None, "action_match": action_ok,
            "arguments_match": action_ok and predicted.action_input == gold.action_input,
            "finish_match": finish_ok, "error": error}


def replay_metrics(records: list[dict]) -> dict:
    n = len(records)
    return {"steps": n,
            "parse_rate": _rate(sum(r["parsed"] for r in records), n),
            "action_accuracy": _rate(sum(r["action_match"] for r in records), n),
            "argument_exact_match": _rate(sum(r["arguments_match"] for r in records), n),
            "finish_accuracy": _rate(sum(r["finish_match"] for r in records), n),
            "gold_finish_steps": sum(r["gold"]["action"] == FINISH for r in records)}


# ============================================================================ output

COLUMNS = {
    "stabletoolbench": [("queries", "queries"), ("offline pass", "offline_pass_rate"), ("finish", "finish_rate"),
                        ("format ok", "format_valid_rate"), ("halluc. fn", "hallucinated_function_rate"),
                        ("args ok", "argument_valid_rate"), ("rel. recall", "relevant_api_recall"),
                        ("steps", "mean_steps")],
    "replay": [("steps", "steps"), ("parse", "parse_rate"), ("action", "action_accuracy"),
               ("args EM", "argument_exact_match"), ("finish", "finish_accuracy")],
}
COLUMNS["bfcl"] = [("questions", "queries"), ("correct", "correct"), ("accuracy", "accuracy"),
                   ("not fitting", "not_fitting"), ("unparsable", "unparsable_steps")]
COLUMNS["synthetic"] = COLUMNS["stabletoolbench"][:1] + [("pass", "pass_rate")] + COLUMNS["stabletoolbench"][1:]


def table(suite: str, results: dict) -> str:
    columns = COLUMNS[suite]
    rows = [(name, m) for name, m in results["subsets"].items()] + [("overall", results["overall"])]
    width = max(len(name) for name, _ in rows)

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"{'subset':<{width}}  " + "  ".join(f"{h:>11}" for h, _ in columns)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{cell(m.get(k)):>11}" for _, k in columns) for name, m in rows]
    return "\n".join(lines)


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            # default=repr: arguments read by ast.literal_eval may hold sets or bytes, which JSON lacks.
            f.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")


def _by(key, items) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


# ============================================================================ main

def run_suite(args, decoder: Decoder, key: str | None, skipped: list) -> tuple[dict, dict]:
    """Run args.suite, write its per-item records (and the judge's input) under args.out; return the
    metrics (per subset, overall)."""
    out = args.out
    if args.suite == "replay":
        items = replay_items(args.data, args.tools, args.limit, args.skip_bad, skipped)
        records = run_replay(items, decoder)
        groups = _by(lambda r: r["source"], records)
        for name, rs in groups.items():
            write_jsonl(out / "records" / f"{name}.jsonl", rs)
        return {name: replay_metrics(rs) for name, rs in groups.items()}, replay_metrics(records)
    if args.suite == "bfcl":
        return run_bfcl(args, decoder, skipped)
    if args.suite == "stabletoolbench":
        make_env = recorded_env if not args.tool_server else (
            lambda query: server_env(query, args.tool_server, key, args.tool_timeout))
        episodes = stabletoolbench_episodes(args.data, args.tools, args.limit, args.skip_bad, skipped, make_env)
    else:
        episodes = synthetic_episodes(args.data, args.limit, args.skip_bad, skipped)
    run_episodes(episodes, decoder, args.max_steps, args.suite, workers=args.tool_workers if args.tool_server else 1)
    groups = _by(lambda e: e.subset, episodes)
    if args.suite == "synthetic":
        scores = synthetic_scores(episodes)
        subsets = {name: synthetic_metrics(es, scores) for name, es in groups.items()}
        overall = synthetic_metrics(episodes, scores)
    else:
        subsets = {name: episode_metrics(es) for name, es in groups.items()}
        overall = episode_metrics(episodes)
    for name, es in groups.items():
        records = [episode_record(e) for e in es]
        if args.suite == "synthetic":
            for record, e in zip(records, es):
                record["score"] = scores[e.query_id]
        write_jsonl(out / "records" / f"{name}.jsonl", records)
        if args.suite == "stabletoolbench":
            write_judge_input(out, name, es)
    return subsets, overall


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Taken out of args before anything prints or saves them: the key goes to the tool server only.
    key = vars(args).pop("toolbench_key") or os.environ.get("TOOLBENCH_KEY")
    started = time.perf_counter()
    print(f"evaluate: {json.dumps(vars(args), default=str)}")

    # ------------------------------------------------------------------ model and tokenizer
    try:
        model_dir = resolve_checkpoint(args.model)
        model = slm.load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device, kernels=args.kernels)
        tok = slm.load_tokenizer(args.tokenizer or model_dir)
    except (slm.CheckpointError, FileNotFoundError, ValueError) as err:   # all name the file at fault
        raise SystemExit(f"evaluate.py: {err}") from None
    print(f"evaluate: kernels {','.join(f'{op}={name}' for op, name in model.kernels.items())}")
    max_len = args.max_len or model.config.max_position_embeddings
    if max_len > model.config.max_position_embeddings or args.max_new_tokens >= max_len:
        raise SystemExit(f"--max-len {max_len} must be at most the model's {model.config.max_position_embeddings} "
                         f"positions and above --max-new-tokens {args.max_new_tokens}")
    decoder = Decoder(model, tok, max_len, args.max_new_tokens, args.batch_size, constrained=args.constrained)
    loaded = time.perf_counter()

    # ------------------------------------------------------------------ the suite
    skipped: list[str] = []
    out = args.out
    try:
        subsets, overall = run_suite(args, decoder, key, skipped)
    except InputError as err:
        raise SystemExit(f"evaluate.py: {err}") from None

    # ------------------------------------------------------------------ results
    finished = time.perf_counter()
    results = {
        "suite": args.suite,
        "decoding": "constrained (slm.step_grammar, tool choice auto)" if args.constrained else "unconstrained",
        "budget_redone": decoder.budget_redone,   # constrained steps without an end, decoded again under a budget
        "grammar_failed": decoder.grammar_failed,   # constrained steps that llguidance gave up on (decoded free)
        "note": "offline_pass_rate is this evaluator's offline gate, not ToolBench's judged pass rate"
                if args.suite == "stabletoolbench" else "",
        "model": str(args.model), "model_dir": str(model_dir), "tokenizer": str(args.tokenizer or model_dir),
        "commit": git_commit(),
        "config": json.loads(json.dumps(vars(args), default=str)) | {"max_len": max_len, "kernels": model.kernels},
        "data": [str(p) for p in args.data] if args.data else (
            f"bfcl-eval {overall['bfcl_eval_version']}" if args.suite == "bfcl" else "in-memory synthetic test split"),
        "subsets": subsets, "overall": overall, "skipped": skipped,
        "timings": {"load_s": loaded - started, "evaluate_s": finished - loaded, "generate_s": decoder.seconds,
                    "generate_calls": decoder.calls, "new_tokens": decoder.new_tokens,
                    "new_tokens_per_s": _rate(decoder.new_tokens, decoder.seconds),
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")

    if args.suite != "replay":
        plot_pass_rate(results, out / "pass_rate.png")
    print(table(args.suite, results))
    if args.suite == "stabletoolbench":
        print("tool calls: " + ", ".join(f"{outcome} {n}" for outcome, n in overall["calls"].items())
              + f" ({'tool server ' + args.tool_server if args.tool_server else 'recorded environment'})")
    if args.suite == "bfcl":
        print(bfcl.columns_text(overall))
    if args.suite == "synthetic":
        by_type = overall["pass_rate_by_type"]
        print("pass rate by task type: " + ", ".join(f"{kind} {rate:.3f}" for kind, rate in by_type.items()))
    if skipped:
        print(f"skipped {len(skipped)} malformed input item(s) (all in results.json 'skipped'):")
        for message in skipped[:5]:
            print(f"  {message}")
    t = results["timings"]
    print(f"{args.suite}: {t['new_tokens']} new tokens in {t['generate_s']:.1f} s of decoding "
          f"({t['new_tokens_per_s'] or 0:.0f} tok/s), {t['evaluate_s']:.1f} s in all; results in {out}")
    return results


if __name__ == "__main__":
    main()
