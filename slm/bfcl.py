"""BFCL (the Berkeley Function Calling Leaderboard): its questions as ToolBench conversations, our
calls as its result files, and its scores computed by bfcl_eval's own checker.

    entries = bfcl.load_entries("simple_python")           # bfcl_eval's loader, language hints included
    history = bfcl.conversation(entries[0])                # the [system, user] opening the model was trained on
    calls = bfcl.calls_from_steps([step_text, ...])        # [{"name", "arguments"}, ...] until Finish
    bfcl.result_text(calls)                                # what BFCL's result file holds for the question

    python -m slm.bfcl score eval-bfcl/bfcl_predictions.jsonl [--json OUT] [--partial]

Scoring registers a model with bfcl_eval whose handler decodes with its own `HammerHandler.decode_ast`
(result text `[{"name": ..., "arguments": {...}}]`, "" for no call) and runs
`bfcl_eval.eval_checker.eval_runner.main` on result files written to a fresh folder. BFCL pairs answers
with questions by position and only checks counts, so duplicated or missing ids are refused here.
The columns are the leaderboard's (`generate_leaderboard_csv`): Non-Live AST, Live (AST),
Irrelevance, Relevance; its Overall needs multi-turn and agentic categories and is never reported.

`bfcl_eval.constants.model_config` imports every provider SDK (openai, anthropic, ...); the checker
reads only `ModelConfig` and `MODEL_CONFIG_MAPPING` from it, so a stand-in module holding those two
replaces that one import. Install: `pip install -e ".[bfcl]"` then `pip install --no-deps bfcl-eval==2026.3.23`.
"""

import argparse
import csv
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

from . import toolbench
from .tool_env import CallResult, ToolEnv
from .toolbench import FINISH, FINISH_FUNCTION

BFCL_EVAL_VERSION = "2026.3.23"
MODEL = "slm-react"   # the registered model: no "_" (BFCL turns "_" back into "/")
NON_LIVE = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
            "irrelevance")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance",
        "live_relevance")
GROUPS = {"non_live": NON_LIVE, "live": LIVE}
# BFCL's parameter types as JSON-schema types (its "dict", "float", "tuple", "any" are Python's words).
_JSON_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


class ScoreError(ValueError):
    """Predictions BFCL cannot score as they are (an id twice, a question without an answer)."""


# ============================================================================ bfcl_eval, imported once

@dataclass
class ModelConfig:
    """The fields of bfcl_eval.constants.model_config.ModelConfig the checker reads."""

    model_name: str
    display_name: str
    url: str
    org: str
    license: str
    model_handler: type
    input_price: float | None = None
    output_price: float | None = None
    is_fc_model: bool = True
    underscore_to_dot: bool = False


def _bfcl_eval():
    """Import bfcl_eval with the model_config stand-in and a project root outside site-packages."""
    if "bfcl_eval.constants.model_config" not in sys.modules:
        # Read once at import: BFCL creates result/ and score/ under it, never site-packages.
        os.environ.setdefault("BFCL_PROJECT_ROOT", tempfile.mkdtemp(prefix="slm-bfcl-"))
        stand_in = types.ModuleType("bfcl_eval.constants.model_config")
        stand_in.ModelConfig, stand_in.MODEL_CONFIG_MAPPING = ModelConfig, {}
        sys.modules[stand_in.__name__] = stand_in
    try:
        import bfcl_eval
        from bfcl_eval import utils
        from bfcl_eval.constants.model_config import MODEL_CONFIG_MAPPING
        from bfcl_eval.eval_checker import eval_runner
        from bfcl_eval.model_handler.local_inference.hammer import HammerHandler
    except ImportError as err:
        raise SystemExit(f"slm.bfcl needs bfcl-eval ({err}): pip install -e \".[bfcl]\" && "
                         f"pip install --no-deps bfcl-eval=={BFCL_EVAL_VERSION}") from None
    MODEL_CONFIG_MAPPING.setdefault(MODEL, ModelConfig(
        model_name=MODEL, display_name="slm (ReAct, ToolBench format)", url="", org="slm", license="",
        model_handler=HammerHandler, is_fc_model=True, underscore_to_dot=False))
    return bfcl_eval, utils, eval_runner


def categories_of(names) -> list[str]:
    """--bfcl-categories words (non_live, live, or category names) as category names, in order."""
    out = []
    for name in names:
        group = GROUPS.get(name, (name,))
        unknown = [c for c in group if c not in NON_LIVE + LIVE]
        if unknown:
            raise ValueError(f"unknown BFCL category {unknown[0]!r}; expected non_live, live or one of "
                             f"{', '.join(NON_LIVE + LIVE)}")
        out += [c for c in group if c not in out]
    return out


def load_entries(category: str, data_dir=None) -> list[dict]:
    """The questions of one category as bfcl_eval's loader gives them (functions with language hints);
    `data_dir` reads `BFCL_v4_<category>.json` from another folder through the same loader steps."""
    _, utils, _ = _bfcl_eval()
    if data_dir is None:
        return utils.load_dataset_entry(category)
    path = Path(data_dir) / f"{utils.VERSION_PREFIX}_{category}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such BFCL question file")
    return utils.add_language_specific_hint_to_function_doc(utils.load_file(path))


def load_answers(category: str) -> list[dict]:
    """BFCL's possible answers of a category (none for irrelevance / relevance)."""
    _, utils, _ = _bfcl_eval()
    return utils.load_ground_truth_entry(category)


# ============================================================================ questions as ToolBench conversations

def _schema(node):
    """BFCL's parameter schema with JSON-schema type names, recursively."""
    if isinstance(node, dict):
        node = {key: _schema(value) for key, value in node.items()}
        if isinstance(node.get("type"), str):
            node["type"] = _JSON_TYPES.get(node["type"], node["type"])
        return node
    return [_schema(value) for value in node] if isinstance(node, list) else node


def functions_for(entry: dict, underscore: bool = False) -> list[dict]:
    """The entry's functions as ToolBench functions, names verbatim (case kept), "." -> "_" only when
    `underscore`; parameters a JSON-schema object; Finish last."""
    functions = []
    for function in entry["function"]:
        name = function["name"].replace(".", "_") if underscore else function["name"]
        parameters = _schema(function.get("parameters") or {"type": "dict", "properties": {}})
        functions.append({"name": name, "description": function.get("description", ""),
                          "parameters": {**parameters, "type": "object"}})
    return functions + [FINISH_FUNCTION]


def user_query(entry: dict) -> str:
    """The user's text: BFCL's question is a list of turns, each a list of messages; the single-turn
    categories hold one turn whose user messages are joined."""
    messages = [m for turn in entry["question"] for m in turn]
    return "\n".join(m["content"] for m in messages if m.get("role") == "user")


def conversation(entry: dict, underscore: bool = False) -> list[dict]:
    """The [system, user] opening the model was trained on (ToolBench's system prompt and user turn)."""
    functions = functions_for(entry, underscore)
    tools = [(f["name"], f["description"]) for f in functions if f["name"] != FINISH]
    return toolbench.opening(toolbench.system_prompt(functions, tools), user_query(entry))


# The one observation every non-Finish action gets: BFCL scores the calls a prompt leads to, so the
# model is told only that its call went through, never a result that could steer what it calls next.
OBSERVATION = json.dumps({"error": "", "response": "ok"})


class FixedEnv(ToolEnv):
    """Answers every call, declared or not, with OBSERVATION (no argument checks, no coercion)."""

    def __init__(self, functions: list[dict]):
        super().__init__(functions, lambda name, arguments, text: OBSERVATION)

    def call(self, name: str, arguments: dict, text: str | None = None) -> CallResult:
        return CallResult(OBSERVATION, "ok" if name in self.functions else "undeclared")


# ============================================================================ our steps as BFCL's result

def calls_from_steps(step_texts) -> list[dict]:
    """Each non-Finish action's {"name", "arguments"} in order, stopping at Finish or at the first step
    that does not parse."""
    calls = []
    for text in step_texts:
        try:
            step = toolbench.parse_step(text)
        except toolbench.ParseError:
            break
        if step.action == FINISH:
            break
        calls.append({"name": step.action, "arguments": step.action_input})
    return calls


def result_text(calls: list[dict]) -> str:
    """BFCL's result for one question: "" (no call) or the JSON list HammerHandler.decode_ast reads."""
    return json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls],
                      ensure_ascii=False, default=repr) if calls else ""


# ============================================================================ scoring

def read_predictions(path) -> list[dict]:
    """bfcl_predictions.jsonl: one {id, category, calls, ...} per line."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record.get("id"), str) or not isinstance(record.get("calls"), list):
                raise ValueError("expected an object with a string 'id' and a 'calls' list")
        except (ValueError, AttributeError) as err:
            raise ScoreError(f"{path}: line {number} is not a prediction ({err})") from None
        records.append(record)
    return records


def category_of(question_id: str) -> str:
    """simple_python_12 -> simple_python; live_multiple_3-1-0 -> live_multiple."""
    return question_id.rsplit("_", 1)[0]


def write_results(records: list[dict], result_dir, partial: bool = False) -> list[str]:
    """BFCL's result files (result/<model>/{non_live,live}/BFCL_v4_<cat>_result.json) for the records;
    the categories written. Refuses an id twice, an unknown id, or (unless partial) a missing one."""
    _, utils, _ = _bfcl_eval()
    by_category: dict[str, dict[str, dict]] = {}
    for record in records:
        category = record.get("category") or category_of(record["id"])
        if category not in NON_LIVE + LIVE:
            raise ScoreError(f"prediction {record['id']!r}: category {category!r} is not one BFCL scores here")
        seen = by_category.setdefault(category, {})
        if record["id"] in seen:
            raise ScoreError(f"prediction {record['id']!r} appears twice; BFCL pairs answers by position")
        seen[record["id"]] = record
    for category, predictions in by_category.items():
        ids = [entry["id"] for entry in load_entries(category)]
        unknown = sorted(set(predictions) - set(ids))
        if unknown:
            raise ScoreError(f"{len(unknown)} {category} prediction(s) name no BFCL question, e.g. {unknown[0]!r}")
        missing = [i for i in ids if i not in predictions]
        if missing and not partial:
            raise ScoreError(f"{len(missing)} of {len(ids)} {category} question(s) have no prediction, e.g. "
                             f"{missing[0]!r} (score a --limit run with --partial)")
        folder = Path(result_dir) / MODEL / utils.get_directory_structure_by_category(category)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{utils.VERSION_PREFIX}_{category}_result.json", "w", encoding="utf-8") as f:
            for i in ids:
                if i in predictions:
                    f.write(json.dumps({"id": i, "result": result_text(predictions[i]["calls"])},
                                       ensure_ascii=False) + "\n")
    return list(by_category)


def _csv_row(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f)]
    return rows[0] if rows else {}


def _percent(value: str | None):
    """The leaderboard CSV's "67.92%" as 0.6792; "N/A" as None."""
    return None if value in (None, "", "N/A") else float(value.rstrip("%")) / 100


def score(records: list[dict], out_dir=None, partial: bool = False) -> dict:
    """Score predictions with bfcl_eval's runner: result files in out_dir/result, scores in a fresh
    out_dir/score (out_dir: a new temporary folder when None); the categories and the columns."""
    _, utils, eval_runner = _bfcl_eval()
    work = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="slm-bfcl-"))
    result_dir, score_dir = work / "result", work / "score"
    for folder in (result_dir / MODEL, score_dir):   # BFCL reads every score file it finds there
        shutil.rmtree(folder, ignore_errors=True)
    categories = write_results(records, result_dir, partial)
    # bfcl_eval prints its progress; it is kept out of our stdout, which holds the table.
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        eval_runner.main([MODEL], categories, str(result_dir), str(score_dir), partial_eval=partial)
    finally:
        sys.stdout = stdout
    scores = {}
    for category in categories:
        path = score_dir / MODEL / utils.get_directory_structure_by_category(category) / \
            f"{utils.VERSION_PREFIX}_{category}_score.json"
        header = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        scores[category] = {"correct": header["correct_count"], "total": header["total_count"],
                            "accuracy": header["accuracy"]}
    # The leaderboard's own columns, from the CSVs its generate_leaderboard_csv wrote.
    non_live, live = _csv_row(score_dir / "data_non_live.csv"), _csv_row(score_dir / "data_live.csv")
    return {
        "categories": scores,
        "non_live_ast": _percent(non_live.get("AST Summary")) if set(NON_LIVE[:-1]) <= set(scores) else None,
        "live_ast": _percent(live.get("AST Summary")) if set(LIVE[:4]) <= set(scores) else None,
        "irrelevance": _mean(scores, ("irrelevance", "live_irrelevance")),
        "relevance": scores["live_relevance"]["accuracy"] if "live_relevance" in scores else None,
        "partial": partial,
        "bfcl_eval_version": importlib.metadata.version("bfcl-eval"),
        "result_dir": str(result_dir), "score_dir": str(score_dir),
    }


def _mean(scores: dict, categories) -> float | None:
    """The leaderboard's unweighted mean of the categories' accuracies (None unless all were scored)."""
    if not all(c in scores for c in categories):
        return None
    return sum(scores[c]["accuracy"] for c in categories) / len(categories)


COLUMNS = (("Non-Live AST", "non_live_ast"), ("Live AST", "live_ast"), ("Irrelevance", "irrelevance"),
           ("Relevance", "relevance"))


def columns_text(scores: dict) -> str:
    """The leaderboard's columns as one line ("-" for a column whose categories were not all run)."""
    cells = [f"{name} {'-' if scores[key] is None else f'{100 * scores[key]:.2f}'}" for name, key in COLUMNS]
    note = " (partial: not comparable with the leaderboard)" if scores["partial"] else ""
    return "BFCL: " + ", ".join(cells) + note


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m slm.bfcl", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scorer = commands.add_parser("score", help="score bfcl_predictions.jsonl with bfcl_eval's checker")
    scorer.add_argument("predictions", type=Path)
    scorer.add_argument("--json", type=Path, default=None, help="write the scores here")
    scorer.add_argument("--partial", action="store_true",
                        help="score only the questions present (a --limit run; not comparable with the leaderboard)")
    args = parser.parse_args(argv)
    try:
        scores = score(read_predictions(args.predictions), partial=args.partial)
    except (OSError, ScoreError) as err:
        raise SystemExit(f"slm.bfcl: {err}") from None
    for category, s in scores["categories"].items():
        print(f"{category:<24} {s['correct']:>5} / {s['total']:<5} {100 * s['accuracy']:6.2f}")
    print(columns_text(scores))
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
