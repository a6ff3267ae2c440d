"""Token shards (ids + loss mask) and the loader that packs them into training batches.

    from slm.data import ShardDataset, PackedLoader, split_by_query, IGNORE_INDEX
    ds = ShardDataset("data/toolbench", fingerprint=tok.fingerprint, max_len=2048)
    train_idx, eval_idx = split_by_query(ds, eval_fraction=0.01, seed=0)
    loader = PackedLoader(ds, seq_len=2048, rows=8, seed=0, indices=train_idx, rank=0, world_size=1)
    for batch in loader:          # Batch(input_ids, targets, lm_targets, cu_seqlens, ...)
        ...
    state = loader.state_dict()   # save with the checkpoint; loader.load_state_dict(state) resumes

A shard directory (written by `ShardWriter`, i.e. by `python data/prepare.py`) holds:
    ids.bin      all examples' token ids back to back (uint16 when the vocabulary has < 65536 ids)
    mask.bin     one uint8 per token, 1 = trained
    offsets.npy  int64 (N+1,): example i is ids[offsets[i]:offsets[i+1]]
    groups.npy   uint64 (N,): a hash of each example's query, so a held-out split never shares a query
    stats.json   what preparation read, wrote, fitted and dropped
    meta.json    format version, tokenizer fingerprint, max_len, dtype — written last: its presence
                 marks a complete directory

The (inputs, targets) shift happens here and only here: an example of n tokens gives n-1 inputs
ids[:-1] and targets ids[1:], a target being IGNORE_INDEX where its token is not trained.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import PAD_ID

IGNORE_INDEX = -100  # the one ignore index: targets that carry no loss (slm re-exports it)
FORMAT_VERSION = 1
FILES = ("ids.bin", "mask.bin", "offsets.npy", "groups.npy", "stats.json", "meta.json")


def query_hash(query: str) -> int:
    return int.from_bytes(hashlib.blake2b(query.encode("utf-8"), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Appends examples to a shard directory; `close(stats)` publishes it (temp files + rename)."""

    def __init__(self, directory, vocab_size: int, fingerprint: str, max_len: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        self.meta = {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": fingerprint,
                     "max_len": max_len, "vocab_size": vocab_size, "dtype": np.dtype(self.dtype).name}
        # Any earlier meta.json goes first, so a crash below never leaves a directory that looks complete.
        (self.directory / "meta.json").unlink(missing_ok=True)
        self._ids = open(self._tmp("ids.bin"), "wb")
        self._mask = open(self._tmp("mask.bin"), "wb")
        self.offsets, self.groups = [0], []

    def _tmp(self, name: str) -> Path:
        return self.directory / f".{name}.tmp"

    def add(self, ids: list[int], mask: list[int], query: str) -> None:
        if len(ids) != len(mask):
            raise ValueError(f"example has {len(ids)} ids but {len(mask)} mask values")
        if max(ids) >= self.meta["vocab_size"]:
            raise ValueError(f"token id {max(ids)} is outside the tokenizer's {self.meta['vocab_size']} ids")
        np.asarray(ids, dtype=self.dtype).tofile(self._ids)
        np.asarray(mask, dtype=np.uint8).tofile(self._mask)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.groups.append(query_hash(query))

    def close(self, stats: dict) -> None:
        self._ids.close()
        self._mask.close()
        np.save(self._tmp("offsets.npy"), np.asarray(self.offsets, dtype=np.int64))
        np.save(self._tmp("groups.npy"), np.asarray(self.groups, dtype=np.uint64))
        self._tmp("stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        self._tmp("meta.json").write_text(json.dumps({**self.meta, "examples": len(self.groups)},
                                                     indent=2, sort_keys=True) + "\n")
        # np.save appends ".npy" to names that lack it
        for name in FILES:
            tmp = self._tmp(name)
            if not tmp.exists():
                tmp = tmp.with_name(tmp.name + ".npy")
            os.replace(tmp, self.directory / name)


# --------------------------------------------------------------------------------------------------
# Reading


class ShardDataset:
    """The examples of a shard directory, memory-mapped. `ds[i]` -> (ids, mask) numpy arrays."""

    def __init__(self, directory, fingerprint: str | None = None, max_len: int | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a finished shard directory (no meta.json): "
                                    "run `python data/prepare.py --out DIR ...` first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')}, this code reads "
                             f"{FORMAT_VERSION}; prepare the data again")
        if fingerprint is not None and self.meta["tokenizer_fingerprint"] != fingerprint:
            raise ValueError(f"{meta_path}: shards were made with tokenizer "
                             f"{self.meta['tokenizer_fingerprint'][:12]}…, expected {fingerprint[:12]}…; "
                             "prepare the data again with this tokenizer")
        if max_len is not None and self.meta["max_len"] != max_len:
            raise ValueError(f"{meta_path}: shards were fitted to max_len {self.meta['max_len']}, expected {max_len}")
        self.max_len = self.meta["max_len"]
        self.offsets = np.load(self.directory / "offsets.npy")
        self.groups = np.load(self.directory / "groups.npy")
        total = int(self.offsets[-1])
        # np.memmap refuses empty files; an empty dataset is still a valid (if useless) directory
        dtype = self.meta["dtype"]
        self.ids = np.memmap(self.directory / "ids.bin", dtype=dtype, mode="r") if total else np.zeros(0, dtype)
        self.mask = np.memmap(self.directory / "mask.bin", dtype=np.uint8, mode="r") if total else np.zeros(0, np.uint8)
        if len(self.ids) != total or len(self.mask) != total:
            raise ValueError(f"{self.directory}: ids.bin has {len(self.ids)} tokens and mask.bin {len(self.mask)}, "
                             f"offsets.npy says {total}")
        self.lengths = np.diff(self.offsets)

    @property
    def stats(self) -> dict:
        return json.loads((self.directory / "stats.json").read_text())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.ids[start:end], dtype=np.int64), np.asarray(self.mask[start:end])


def split_by_query(ds: ShardDataset, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a query is held out when hash(seed, query) falls in the fraction.

    Splitting by query keeps every piece of a trajectory on one side.
    """
    keys = np.array([query_hash(f"{seed}:{g}") for g in ds.groups.tolist()], dtype=np.uint64)
    held = keys.astype(np.float64) / 2.0**64 < eval_fraction
    return np.flatnonzero(~held), np.flatnonzero(held)


# --------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    input_ids: torch.Tensor             # (B, T) int64
    targets: torch.Tensor               # (B, T) int64, IGNORE_INDEX where no loss
    lm_targets: torch.Tensor            # (B, T) int64, every next token of an example (language modelling)
    cu_seqlens: torch.Tensor | None     # packed: int32 (N+1,) over the flattened B*T tokens; padded: None
    max_seqlen: int                     # longest segment (packed) or longest example (padded)
    attention_mask: torch.Tensor | None # padded: (B, T) int64, 1 = real token; packed: None
    n_trained: int                      # targets != IGNORE_INDEX
    n_tokens: int                       # real (non-padding) input tokens


class PackedLoader:
    """Deterministic, resumable, rank-sharded batches over a ShardDataset.

    packed (default): each epoch the examples are shuffled (seed, epoch) and packed first-fit into
    rows of `seq_len` input tokens (an example of n tokens takes n-1), keeping at most
    `open_rows` rows open; `rows` rows make a micro-batch. A row's unused tail is padding forming a
    segment of its own. padded: one example per row, right-padded with PAD_ID to the batch's longest.

    Distributed: step s of every rank reads global batch s (world_size * rows rows); rank r takes its
    r-th slice, so ranks see disjoint rows and the same number of steps. The epoch's last global
    batch is completed with filler rows that carry no loss. `state_dict()` records (epoch, step) of
    the next batch; `load_state_dict` resumes there.
    """

    def __init__(self, dataset: ShardDataset, seq_len: int | None = None, rows: int = 8, seed: int = 0,
                 indices=None, mode: str = "packed", rank: int = 0, world_size: int = 1,
                 epochs: int | None = 1, open_rows: int = 64):
        if mode not in ("packed", "padded"):
            raise ValueError(f"mode must be 'packed' or 'padded', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset, self.rows, self.seed, self.mode = dataset, rows, seed, mode
        self.seq_len = seq_len or dataset.max_len
        self.rank, self.world_size, self.epochs, self.open_rows = rank, world_size, epochs, open_rows
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        too_long = self.indices[dataset.lengths[self.indices] - 1 > self.seq_len]
        if len(too_long):
            raise ValueError(f"example {int(too_long[0])} has {int(dataset.lengths[too_long[0]])} tokens, more than "
                             f"seq_len {self.seq_len} + 1: prepare with --max-len <= seq_len + 1")
        self.epoch, self.step = 0, 0
        self._plan_epoch, self._plan = None, None

    # -- the plan of one epoch: a list of rows, each a list of example indices --

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return self.indices[rng.permutation(len(self.indices))]

    def _rows_of_epoch(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch == epoch:
            return self._plan
        order = self._order(epoch).tolist()
        if self.mode == "padded":
            plan = [[i] for i in order]
        else:
            plan, open_rows, space = [], [], []
            for i in order:
                need = int(self.dataset.lengths[i]) - 1
                slot = next((k for k, free in enumerate(space) if free >= need), None)
                if slot is None:
                    if len(open_rows) == self.open_rows:  # close the oldest open row
                        plan.append(open_rows.pop(0))
                        space.pop(0)
                    open_rows.append([])
                    space.append(self.seq_len)
                    slot = len(open_rows) - 1
                open_rows[slot].append(i)
                space[slot] -= need
            plan += open_rows
        per_step = self.rows * self.world_size
        plan += [[] for _ in range(-len(plan) % per_step)]   # filler rows complete the last global batch
        self._plan_epoch, self._plan = epoch, plan
        return plan

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every rank)."""
        return len(self._rows_of_epoch(0)) // (self.rows * self.world_size)

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            plan = self._rows_of_epoch(self.epoch)
            steps = len(plan) // (self.rows * self.world_size)
            while self.step < steps:
                start = (self.step * self.world_size + self.rank) * self.rows
                batch = self._batch(plan[start:start + self.rows])
                self.step += 1
                yield batch
            self.epoch, self.step = self.epoch + 1, 0

    def _shifted(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Example i as (inputs, trained targets, every next token)."""
        ids, mask = self.dataset[i]
        return ids[:-1], np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX), ids[1:]

    def _batch(self, rows: list[list[int]]) -> Batch:
        if self.mode == "padded":
            return self._padded_batch(rows)
        T = self.seq_len
        input_ids = np.full((len(rows), T), PAD_ID, dtype=np.int64)
        targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        lm_targets = targets.copy()
        cu, n_tokens = [0], 0
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                inputs, tgt, lm = self._shifted(i)
                input_ids[r, pos:pos + len(inputs)] = inputs
                targets[r, pos:pos + len(inputs)] = tgt
                lm_targets[r, pos:pos + len(inputs)] = lm
                pos += len(inputs)
                cu.append(r * T + pos)
            n_tokens += pos
            if pos < T:  # the padding tail is its own segment, so no real token attends to it
                cu.append((r + 1) * T)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        return Batch(torch.from_numpy(input_ids), torch.from_numpy(targets), torch.from_numpy(lm_targets),
                     cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), None,
                     int((targets != IGNORE_INDEX).sum()), n_tokens)

    def _padded_batch(self, rows: list[list[int]]) -> Batch:
        examples = [self._shifted(row[0]) for row in rows if row]
        T = max((len(x) for x, _, _ in examples), default=1)
        input_ids = np.full((len(rows), T), PAD_ID, dtype=np.int64)
        targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        lm_targets = targets.copy()
        attention_mask = np.zeros((len(rows), T), dtype=np.int64)
        for r, (inputs, tgt, lm) in enumerate(examples):
            input_ids[r, :len(inputs)] = inputs
            targets[r, :len(inputs)] = tgt
            lm_targets[r, :len(inputs)] = lm
            attention_mask[r, :len(inputs)] = 1
        # A filler row keeps its first token visible: a row with every key masked would give NaNs.
        attention_mask[len(examples):, 0] = 1
        return Batch(torch.from_numpy(input_ids), torch.from_numpy(targets), torch.from_numpy(lm_targets),
                     None, T, torch.from_numpy(attention_mask), int((targets != IGNORE_INDEX).sum()),
                     int(sum(len(x) for x, _, _ in examples)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "mode": self.mode,
                "rows": self.rows, "seq_len": self.seq_len, "world_size": self.world_size,
                "examples": len(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "mode", "rows", "seq_len", "world_size", "examples"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{self.state_dict()[key]!r}: resume with the same data settings")
        self.epoch, self.step = state["epoch"], state["step"]
