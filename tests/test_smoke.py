"""The offline main job end to end, shortened for CI: `train.py --preset smoke`, then `evaluate.py
--suite synthetic` on held-out tasks, against the same model untrained.

If rendering, loss masking, packing, training, export, decoding or scoring disagreed, the trained
model would not learn to call the held-out tools. The full-length run (README's first command, 13,500
tasks) passes about 95% of the tasks; here 6,000 tasks (765 steps, about 3 minutes on 2 cores) must
already pass a share of them (0.40 on 48 tasks when measured), where the untrained model passes none.
"""

import json
import subprocess
import sys

import pytest

import slm
from conftest import REPO


def run(*args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_smoke_training_learns_the_tool_call_format(tmp_path):
    run("train.py", "--preset", "smoke", "--out", str(tmp_path / "run"), "--smoke-tasks", "6000",
        "--eval-every", "200", cwd=REPO)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Language modelling first, then the turns; the eval loss is the turns' throughout.
    assert {r["objective"] for r in records if "loss" in r} == {"lm", "turns"}
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < 0.25 * evals[0], f"eval loss did not fall: {evals}"

    final = tmp_path / "run" / "final"
    untrained = slm.OPT(slm.load_model(final).config)
    untrained.init_weights(seed=0)
    slm.save_model(untrained, tmp_path / "untrained", tokenizer=final)

    overall = {}
    for name, model in (("trained", final), ("untrained", tmp_path / "untrained")):
        run("evaluate.py", "--model", str(model), "--suite", "synthetic", "--limit", "24",
            "--max-new-tokens", "96", "--out", str(tmp_path / f"eval-{name}"), cwd=REPO)
        results = json.loads((tmp_path / f"eval-{name}" / "results.json").read_text())
        overall[name] = results["overall"]
    trained, base = overall["trained"], overall["untrained"]
    assert base["format_valid_rate"] <= 0.05 and base["pass_rate"] == 0
    assert trained["format_valid_rate"] >= 0.8 and trained["pass_rate"] >= 0.15, overall
