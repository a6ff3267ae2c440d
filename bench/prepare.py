"""Benchmark data/prepare.py: rows/s, tokens/s and peak memory streaming a large ToolLLaMA array.

    python bench/prepare.py [--mb 500] [--cores 2] [--tmp /tmp/slm_bench_prepare] [--no-collapse-too]

It builds a JSON array of at least `--mb` MB from the 30 real rows in ../shared/toolbench/sft
(replicated; each replica's query and system prompt get a serial number so nothing is served from a
cache that real data would miss), writes it under --tmp (never into the repository), then runs
`data/prepare.py` on it in a child process pinned to `--cores` CPU cores and reports the child's wall
time and peak RSS. The full release (toolllama_G123_dfs_train.json, 187,542 rows) is not available
here: its time is *projected* from the measured rows/s. From Python: `run(mb, cores, tmp, no_collapse_too)`
returns the figures as a dict.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench.harness import REPO  # noqa: E402
from slm import provenance  # noqa: E402

SHARED = REPO.parent / "shared"
SFT = SHARED / "toolbench" / "sft" / "toolllama_dfs_data_example.json"
FULL_ROWS = 187_542  # rows in ToolBench's toolllama_G123_dfs_train.json


def build_array(path: Path, megabytes: int) -> int:
    """Write a JSON array of replicated real rows (indent=4, like ToolBench's json.dump); returns rows."""
    rows = json.loads(SFT.read_text())
    written, replica = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        while f.tell() < megabytes * 1_000_000:
            for row in rows:
                tag = f" (#{replica})"
                conversations = [dict(m) for m in row["conversations"]]
                conversations[0]["value"] = conversations[0]["value"].replace(
                    "\nYou have access of the following tools:\n", f"\nYou have access of the following tools{tag}:\n")
                conversations[1]["value"] = conversations[1]["value"].replace("\nBegin!\n", f"{tag}\nBegin!\n")
                copy = {"id": row["id"] + tag, "conversations": conversations}
                f.write(("," if written else "") + "\n" + json.dumps(copy, indent=4, ensure_ascii=False))
                written += 1
            replica += 1
        f.write("\n]")
    return written


def run_prepare(array: Path, out: Path, cores: int, collapse: bool) -> dict:
    """Run data/prepare.py in a child pinned to `cores` cores; returns wall seconds, peak RSS and stats."""
    cmd = [sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(array),
           "--tokenizer", str(SHARED / "opt"), "--out", str(out)] + ([] if collapse else ["--no-collapse"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as stdout:
        child = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.DEVNULL,
                                 preexec_fn=lambda: os.sched_setaffinity(0, set(range(cores))))
        # wait4 gives this child's own resource usage: CPU seconds and peak RSS (kilobytes on Linux)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # tell Popen its child is already reaped
    if child.returncode:
        raise SystemExit(f"prepare.py failed ({child.returncode}), see {log}")
    stats = json.loads((out / "stats.json").read_text())
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stats": stats}


def run(mb: int = 500, cores: int = 2, tmp: str = "/tmp/slm_bench_prepare", no_collapse_too: bool = False) -> dict:
    """Builds the array and runs data/prepare.py on it: {"input", "input_mb", "rows", "cpu", "cores", "commit",
    "modes": {"collapse": run_prepare's figures, and "no-collapse" with no_collapse_too}, "load_average"}."""
    if not SFT.is_file():
        raise FileNotFoundError(f"{SFT} not found: the benchmark builds its input from the real rows there")
    scratch = Path(tmp)
    scratch.mkdir(parents=True, exist_ok=True)
    array = scratch / "toolllama_bench.json"
    rows = build_array(array, mb)
    modes = {"collapse": True, "no-collapse": False} if no_collapse_too else {"collapse": True}
    return {"input": str(array), "input_mb": array.stat().st_size / 1e6, "rows": rows,
            "cpu": platform.processor() or platform.machine(), "cores": cores, "commit": provenance.git_commit(),
            "modes": {mode: run_prepare(array, scratch / f"out_{'collapse' if collapse else 'rows'}", cores, collapse)
                      for mode, collapse in modes.items()},
            "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=500, help="size of the generated array in MB (>= 500 for the report)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the prepare child may use")
    parser.add_argument("--tmp", default="/tmp/slm_bench_prepare", help="scratch directory (outside the repo)")
    parser.add_argument("--no-collapse-too", action="store_true",
                        help="also run with --no-collapse, to measure the token saving of collapsing")
    args = parser.parse_args()
    try:
        result = run(args.mb, args.cores, args.tmp, args.no_collapse_too)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    size_mb, modes = result["input_mb"], result["modes"]
    print(f"input: {result['input']} ({size_mb:,.0f} MB, {result['rows']:,} rows) | cpu: {result['cpu']}, "
          f"{args.cores} cores | commit {result['commit']}")
    print("\n| mode | wall s | CPU s | rows/s | tokens/s | MB/s | peak RSS | examples | tokens | fitted "
          "| dropped turns |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in modes.items():
        s = r["stats"]
        print(f"| {mode} | {r['wall_s']:,.0f} | {r['cpu_s']:,.0f} | "
              f"{s['rows_read'] / r['wall_s']:,.0f} | "
              f"{s['tokens'] / r['wall_s']:,.0f} | {size_mb / r['wall_s']:,.1f} | {r['peak_rss_mb']:,.0f} MB | "
              f"{s['examples']:,} | {s['tokens']:,} | {s['examples_fitted']:,} | {s['turns_dropped_too_long']:,} |")
    r = modes["collapse"]
    rate = r["stats"]["rows_read"] / r["wall_s"]
    cpu_rate = r["stats"]["rows_read"] / r["cpu_s"]
    print(f"\nprojected from measured rows/s (not measured): the full {FULL_ROWS:,}-row file would take "
          f"{FULL_ROWS / rate / 60:,.1f} min of wall time on {args.cores} cores as loaded now "
          f"({FULL_ROWS / cpu_rate / 60:,.1f} CPU-minutes at {cpu_rate:,.0f} rows per CPU-second; target <= 30 min). "
          f"The reader holds about one element, so peak RSS should stay near the {r['peak_rss_mb']:,.0f} MB "
          f"measured here (target <= 2 GB)")
    print(f"load average during the run: {result['load_average']:.1f} (other processes share these cores: wall "
          "times are pessimistic, CPU seconds are not)")
    if "no-collapse" in modes:
        collapsed, rows = modes["collapse"]["stats"], modes["no-collapse"]["stats"]
        print(f"collapsing: {rows['tokens']:,} -> {collapsed['tokens']:,} tokens "
              f"({1 - collapsed['tokens'] / rows['tokens']:.1%} fewer), same trained turns: "
              f"{collapsed['trained_turns']:,} vs {rows['trained_turns']:,}")


if __name__ == "__main__":
    main()
