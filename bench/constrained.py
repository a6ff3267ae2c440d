"""Constrained against free decoding on the synthetic suite, for smoke models trained to fractions of the
smoke preset's steps over several seeds (BENCHMARKS.md's "Constrained decoding" table).

    python bench/constrained.py --out runs/constrained                     # 25/50/100% x seeds 0, 1, 2
    python bench/constrained.py --out runs/constrained --fractions 0.25 --seeds 0 --jobs 1

Each model is `train.py --preset smoke --seed S --max-steps N` in OUT/sS-nN (N = the fraction of
--preset-steps; a run that has final/ is reused), trained --jobs at a time with one thread each. Each is
then evaluated twice by `evaluate.py --suite synthetic` (200 held-out tasks), free and --constrained,
one evaluation at a time, one thread each too: on a machine shared with other jobs, torch's threads
waiting on each other cost the host loop of constrained decoding (many small ops) far more than the
free loop, and the tokens/s would compare the machine, not the decoding. Writes OUT/constrained.json and
prints the table: the mean over the seeds, the lowest and highest in brackets.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402
from slm.provenance import git_commit  # noqa: E402

PRESET_STEPS = 1722   # the smoke preset's steps at its 13,500 tasks: train.py prints "1722 steps in all"
METRICS = [("pass", "pass_rate"), ("format ok", "format_valid_rate"), ("halluc. fn", "hallucinated_function_rate"),
           ("args ok", "argument_valid_rate")]


def train(run: Path, seed: int, steps: int) -> float:
    """Train one smoke model into `run` (reused if its final/ exists); its wall seconds."""
    wall = run / "train_wall_s.txt"
    if (run / "final" / "config.json").exists() and wall.exists():
        return float(wall.read_text())
    run.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with open(run / "train.log", "w") as log:
        subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--seed", str(seed), "--max-steps",
                        str(steps), "--out", str(run)], cwd=harness.REPO, stdout=log, stderr=subprocess.STDOUT,
                       env=os.environ | {"OMP_NUM_THREADS": "1"}, check=True)
    seconds = time.perf_counter() - began
    wall.write_text(f"{seconds:.1f}\n")
    return seconds


def evaluate(run: Path, constrained: bool) -> dict:
    """The synthetic suite's results.json for `run`'s model, decoded free or constrained (reused if there)."""
    out = run / ("eval-constrained" if constrained else "eval-free")
    if not (out / "results.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "evaluate.log", "w") as log:
            subprocess.run([sys.executable, "evaluate.py", "--model", str(run / "final"), "--suite", "synthetic",
                            "--out", str(out)] + (["--constrained"] if constrained else []),
                           cwd=harness.REPO, stdout=log, stderr=subprocess.STDOUT,
                           env=os.environ | {"OMP_NUM_THREADS": "1"}, check=True)
    return json.loads((out / "results.json").read_text())


def steps_trained(run: Path) -> int:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def run(out: Path, seeds: list[int], fractions: list[float], jobs: int = 2, preset_steps: int = PRESET_STEPS) -> dict:
    """Train and evaluate every (fraction, seed); the measurements per fraction and decoding, per seed."""
    plan = [(f, s, max(1, int(f * preset_steps + 0.5))) for f in sorted(fractions, reverse=True) for s in seeds]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:   # the longest trainings first
        walls = dict(zip(plan, pool.map(lambda p: train(out / f"s{p[1]}-n{p[2]}", p[1], p[2]), plan)))
    results = {"preset_steps": preset_steps, "commit": git_commit(), "runs": []}
    for fraction, seed, steps in plan:
        directory = out / f"s{seed}-n{steps}"
        if steps_trained(directory) != steps:
            raise SystemExit(f"{directory}: trained {steps_trained(directory)} steps, expected {steps}")
        for constrained in (False, True):
            res = evaluate(directory, constrained)
            results["runs"].append({
                "fraction": fraction, "seed": seed, "steps": steps, "train_wall_s": walls[(fraction, seed, steps)],
                "decoding": "constrained" if constrained else "free", "budget_redone": res.get("budget_redone", 0),
                "new_tokens_per_s": res["timings"]["new_tokens_per_s"],
                **{key: res["overall"][key] for _, key in METRICS}})
    return results


def table(results: dict) -> str:
    """The markdown table: per fraction and decoding, mean [min-max] over the seeds."""
    def cell(values, digits=3):
        values = [v for v in values if v is not None]   # a rate without cases (no call to check) is None
        if not values:
            return "-"
        return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

    lines = ["| steps (share of preset) | seeds | train wall, min | decoding | " + " | ".join(n for n, _ in METRICS)
             + " | new tok/s | steps redone |", "|" + "---|" * (len(METRICS) + 6)]
    groups: dict[tuple, list] = {}
    for r in results["runs"]:
        groups.setdefault((-r["fraction"], r["decoding"] == "constrained"), []).append(r)
    for (_, _), rows in sorted(groups.items()):
        first = rows[0]
        lines.append(f"| {first['steps']} ({first['fraction']:.0%}) | {len(rows)} | "
                     f"{cell([r['train_wall_s'] / 60 for r in rows], 1)} | {first['decoding']} | "
                     + " | ".join(cell([r[key] for r in rows]) for _, key in METRICS)
                     + f" | {cell([r['new_tokens_per_s'] for r in rows], 0)}"
                     + f" | {sum(r['budget_redone'] for r in rows)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the runs' directory (runs there are reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each")
    parser.add_argument("--preset-steps", type=int, default=PRESET_STEPS)
    args = parser.parse_args()
    results = run(args.out, args.seeds, args.fractions, args.jobs, args.preset_steps)
    (args.out / "constrained.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
