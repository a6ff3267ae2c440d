"""Turn ToolBench data into token shards for train.py: ids + loss mask, collapsed and fitted.

    python -m data.prepare --input toolllama_G123_dfs_train.json --tokenizer ~/models/opt-350m --out shards/toolbench
    python -m data.prepare --input toolbench_dfs/*/*.json --tokenizer ~/models/opt-350m --out /tmp/sft \\
        --max-len 2048 --no-collapse

Run it from the repository root (`python -m` puts it on the import path), or as `python data/prepare.py`
once the project is installed (`pip install -e .`).

Input kinds are detected per file (a ToolLLaMA JSON array, streamed; a DFS answer file; ToolEval
converted answers) or forced with --format. Bad rows are counted by reason in stats.json and skipped;
the run never stops mid-file. The same inputs and settings give byte-identical shards. The prompt
format, loss mask, collapsing and fitting rules are documented in slm/toolbench/ (encode.py, collapse.py,
levels.py); the shard layout in slm/data.py.
"""

import argparse
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from slm import toolbench
from slm.data import ShardWriter
from slm.tokenizer import load_tokenizer

HISTOGRAM_BIN = 128  # tokens per bin of the length histogram


def valid_rows(paths, fmt, tools, stats: Counter, bad: Counter, progress):
    """Every usable row of every input, in order; bad ones are counted by reason and skipped."""
    for path in paths:
        for row in toolbench.read_rows(path, None if fmt == "auto" else fmt, tools):
            stats["rows_read"] += 1
            progress.update()
            if isinstance(row, toolbench.Malformed):
                bad["malformed_json"] += 1
                continue
            try:
                yield toolbench.check_row(row)
            except toolbench.BadRow as err:
                bad[err.reason] += 1


def prepare(paths, tok, out, max_len=2048, collapse=True, fmt="auto", tools_dir=None, window=256,
            show_progress=True) -> dict:
    """Write the shards for `paths` into `out`; returns the stats written to stats.json."""
    tools = toolbench.tool_index(tools_dir) if tools_dir else None
    enc = toolbench.encoder_for(tok)
    writer = ShardWriter(out, tok.vocab_size, tok.fingerprint, max_len)
    stats, bad, levels, level_turns, histogram = Counter(), Counter(), Counter(), Counter(), Counter()
    with tqdm(desc="rows", unit=" rows", disable=not show_progress) as progress:
        rows = valid_rows(paths, fmt, tools, stats, bad, progress)
        for chain in toolbench.chains(rows, collapse=collapse, window=window):
            stats["chains"] += 1
            stats["rows_used"] += chain.rows
            examples, dropped = toolbench.tokenize_chain(chain, enc, max_len)
            stats["turns_dropped_too_long"] += dropped
            for ex in examples:
                writer.add(ex.ids, ex.mask, chain.query)
                stats["examples"] += 1
                stats["tokens"] += len(ex.ids)
                stats["trained_tokens"] += sum(ex.mask)
                stats["trained_turns"] += ex.turns
                levels[toolbench.LEVELS[ex.level].name] += 1
                level_turns[toolbench.LEVELS[ex.level].name] += ex.turns
                histogram[len(ex.ids) // HISTOGRAM_BIN * HISTOGRAM_BIN] += 1
    result = {
        "inputs": [str(p) for p in paths],
        "max_len": max_len,
        "collapse": collapse,
        **{key: stats[key] for key in ("rows_read", "rows_used", "chains", "examples", "tokens",
                                       "trained_tokens", "trained_turns", "turns_dropped_too_long")},
        "rows_bad": dict(sorted(bad.items())),
        "examples_by_fit_level": {level.name: levels[level.name] for level in toolbench.LEVELS},
        "trained_turns_by_fit_level": {level.name: level_turns[level.name] for level in toolbench.LEVELS},
        "examples_fitted": sum(levels.values()) - levels["original"],
        "length_histogram": {f"{start}-{start + HISTOGRAM_BIN - 1}": histogram[start] for start in sorted(histogram)},
    }
    writer.close(result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="ToolBench file(s), read in this order")
    parser.add_argument("--tokenizer", required=True, help="directory with vocab.json + merges.txt")
    parser.add_argument("--out", required=True, help="shard directory to write (replaced if present)")
    parser.add_argument("--max-len", type=int, default=2048, help="tokens per example, BOS included (OPT: 2048)")
    parser.add_argument("--no-collapse", action="store_true",
                        help="one example per row, training only its final turn, as ToolBench did")
    parser.add_argument("--format", choices=["auto", "toolllama", "dfs", "tooleval"], default="auto",
                        help="input kind; auto detects it per file")
    parser.add_argument("--tools", default=None,
                        help="tool JSON directory (tools/toolenv2404) for tool descriptions of ToolEval answers")
    parser.add_argument("--window", type=int, default=256,
                        help="open trajectories a row may be collapsed into (bounds memory)")
    args = parser.parse_args(argv)
    for path in args.input:
        if not Path(path).is_file():
            parser.error(f"--input {path}: no such file")
    stats = prepare(args.input, load_tokenizer(args.tokenizer), args.out, args.max_len, not args.no_collapse,
                    args.format, args.tools, args.window)
    print(f"rows read {stats['rows_read']:,} | bad {sum(stats['rows_bad'].values()):,} {stats['rows_bad']} | "
          f"examples {stats['examples']:,} | tokens {stats['tokens']:,} | trained {stats['trained_tokens']:,} | "
          f"fitted {stats['examples_fitted']:,} | turns dropped (too long) {stats['turns_dropped_too_long']:,}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
