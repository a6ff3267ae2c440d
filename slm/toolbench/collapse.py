"""Collapsing step-exploded rows into trajectories (default on): each trained turn once, in one sequence.

    for chain in toolbench.chains(rows, collapse=True): ...   # a Chain: one conversation, its trained turns

ToolBench's rows are step-exploded: one row per assistant step, each a prefix of the next, training
only its final turn. `collapse` merges rows of the same query whose conversations are prefixes of one
another into the longest one, training every turn that was some row's final turn — the same targets,
each once, in one sequence. ToolBench's preprocessing writes a trajectory's rows one after another
(file by file); whether the 2 GB release kept that order cannot be checked here, so a row merges into
any of the last `window` (256) open trajectories of its query: rows a little out of order still merge
and memory stays bounded. Identical rows merge too (their target is trained once).
"""

from collections import OrderedDict
from dataclasses import dataclass, field

from .readers import query_of


@dataclass
class Chain:
    """One trajectory: its longest conversation and the indices of the assistant turns to train."""

    id: str
    query: str
    conversations: list[dict]
    trained: set[int] = field(default_factory=set)
    rows: int = 0


def _is_prefix(short: list[dict], long: list[dict]) -> bool:
    return len(short) <= len(long) and all(
        a["from"] == b["from"] and a["value"] == b["value"] for a, b in zip(short, long)
    )


def chains(rows, collapse: bool = True, window: int = 256):
    """Chains from valid rows: one per row, or (collapse) one per trajectory within `window` open ones."""
    if not collapse:
        for row in rows:
            conv = row["conversations"]
            yield Chain(row["id"], query_of(row), conv, {len(conv) - 1}, 1)
        return
    open_chains: OrderedDict[int, Chain] = OrderedDict()
    by_query: dict[str, list[int]] = {}
    for serial, row in enumerate(rows):
        conv, query = row["conversations"], query_of(row)
        for key in by_query.get(query, ()):
            chain = open_chains[key]
            if _is_prefix(conv, chain.conversations):
                break
            if _is_prefix(chain.conversations, conv):
                chain.conversations = conv
                break
        else:
            chain = open_chains[serial] = Chain(row["id"], query, conv)
            by_query.setdefault(query, []).append(serial)
            if len(open_chains) > window:
                key, oldest = open_chains.popitem(last=False)
                by_query[oldest.query].remove(key)
                if not by_query[oldest.query]:
                    del by_query[oldest.query]
                yield oldest
        chain.trained.add(len(conv) - 1)
        chain.rows += 1
    yield from open_chains.values()
