"""Debugging: a data file's training examples printed with their trained tokens in ⟦ ⟧ (the mask visualiser).

    python -m slm.toolbench show FILE --tokenizer DIR [--index I] [--no-collapse] [--max-len 2048]
"""

import argparse

from slm.tokenizer import load_tokenizer

from .collapse import chains
from .encode import encoder_for, tokenize_chain
from .levels import LEVELS
from .json_array import Malformed
from .readers import read_rows


def show(ids: list[int], mask: list[int], tok) -> str:
    """The example's text with each trained span wrapped in ⟦ ⟧ (decoded span by span)."""
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tok.decode(ids[start:end])
            parts.append(f"⟦{text}⟧" if mask[start] else text)
            start = end
    return "".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slm.toolbench",
                                     description="Print a file's training examples with trained tokens in ⟦ ⟧.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("show", help="show the examples of one input file")
    cmd.add_argument("file", help="ToolLLaMA array, DFS answer file or ToolEval converted answers")
    cmd.add_argument("--tokenizer", required=True, help="directory with vocab.json + merges.txt")
    cmd.add_argument("--index", type=int, default=None, help="show only this example (0-based)")
    cmd.add_argument("--max-len", type=int, default=2048, help="fitting length")
    cmd.add_argument("--no-collapse", action="store_true", help="one example per row")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    enc = encoder_for(tok)
    rows = (row for row in read_rows(args.file) if not isinstance(row, Malformed))
    n = 0
    for chain in chains(rows, collapse=not args.no_collapse):
        for ex in tokenize_chain(chain, enc, args.max_len)[0]:
            if args.index is None or args.index == n:
                print(f"=== example {n}: {chain.id[:100]!r} | {len(ex.ids)} tokens, {sum(ex.mask)} trained, "
                      f"{ex.turns} trained turn(s), fit level {ex.level} ({LEVELS[ex.level].name})")
                print(show(ex.ids, ex.mask, tok))
            n += 1
