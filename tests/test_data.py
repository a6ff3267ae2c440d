"""Tests of the shard files and the batch loader (slm/data.py) on small synthetic shards.

    pytest tests/test_data.py
"""

import json

import numpy as np
import pytest
import torch

from slm.data import IGNORE_INDEX, PackedLoader, ShardDataset, ShardWriter, split_by_query
from slm.tokenizer import PAD_ID

FINGERPRINT = "f" * 64


def make_shards(directory, lengths, max_len=64, seed=0):
    """Examples of the given lengths: ids count up from 10 + 1000*i (mod 50000), the second half trained."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(directory, vocab_size=50265, fingerprint=FINGERPRINT, max_len=max_len)
    examples = []
    for i, n in enumerate(lengths):
        ids = [2] + [10 + (1000 * i + k) % 50000 for k in range(n - 1)]
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        writer.add(ids, mask, query=f"query {i // 2}")   # two examples per query
        examples.append((ids, mask))
    writer.close({"examples": len(lengths), "seed": int(rng.integers(10))})
    return examples


@pytest.fixture()
def shards(tmp_path):
    lengths = [5, 64, 17, 33, 2, 40, 64, 9, 28, 50, 11, 3, 60, 21]
    examples = make_shards(tmp_path / "s", lengths)
    return ShardDataset(tmp_path / "s", fingerprint=FINGERPRINT, max_len=64), examples


def test_shards_round_trip(shards, tmp_path):
    ds, examples = shards
    assert len(ds) == len(examples) and ds.ids.dtype == np.uint16
    for i, (ids, mask) in enumerate(examples):
        got_ids, got_mask = ds[i]
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
    assert ds.stats["examples"] == len(examples)
    assert not list((tmp_path / "s").glob(".*tmp*"))   # temp files were all renamed


def test_shard_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ShardDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="tokenizer"):
        ShardDataset(tmp_path / "s", fingerprint="0" * 64)
    with pytest.raises(ValueError, match="max_len 64, expected 2048"):
        ShardDataset(tmp_path / "s", max_len=2048)


def _segments(batch):
    cu = batch.cu_seqlens.tolist()
    flat = [t.flatten().tolist() for t in (batch.input_ids, batch.targets, batch.lm_targets)]
    return [tuple(f[a:b] for f in flat) for a, b in zip(cu, cu[1:])]


def test_packing_boundaries_and_shift(shards):
    ds, examples = shards
    loader = PackedLoader(ds, seq_len=64, rows=2, seed=3)
    seen = []
    T = 64
    for batch in loader:
        B = batch.input_ids.shape[0]
        assert batch.input_ids.shape == batch.targets.shape == batch.lm_targets.shape == (2, T)
        assert batch.attention_mask is None
        cu = batch.cu_seqlens
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * T
        assert set(range(0, B * T + 1, T)) <= set(cu.tolist())   # every row boundary is a boundary
        assert batch.max_seqlen == int((cu[1:] - cu[:-1]).max())
        assert batch.n_trained == int((batch.targets != IGNORE_INDEX).sum())
        real = 0
        for inputs, targets, lm_targets in _segments(batch):
            if inputs[0] == PAD_ID:   # a padding tail: its own segment, no loss
                assert set(inputs) == {PAD_ID} and set(targets) == set(lm_targets) == {IGNORE_INDEX}
                continue
            i = next(k for k, (ids, _) in enumerate(examples) if ids[:-1] == inputs)
            ids, mask = examples[i]
            assert targets == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            assert lm_targets == ids[1:]   # every next token of its own example, none of the next one
            seen.append(i)
            real += len(inputs)
        assert batch.n_tokens == real
    assert sorted(seen) == list(range(len(examples)))   # each example exactly once per epoch


def test_padded_mode(shards):
    ds, examples = shards
    batches = list(PackedLoader(ds, rows=4, seed=1, mode="padded"))
    assert len(batches) == 4   # 14 examples -> 3 full batches + one with 2 filler rows
    seen = 0
    for batch in batches:
        assert batch.cu_seqlens is None and batch.attention_mask is not None
        for r in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[r].sum())
            if batch.targets[r].eq(IGNORE_INDEX).all() and batch.input_ids[r, 0] == PAD_ID:
                continue   # filler row
            inputs = batch.input_ids[r, :n].tolist()
            ids, mask = next(e for e in examples if e[0][:-1] == inputs)
            assert batch.input_ids[r, n:].eq(PAD_ID).all() and batch.targets[r, n:].eq(IGNORE_INDEX).all()
            assert batch.targets[r, :n].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            assert batch.lm_targets[r, :n].tolist() == ids[1:] and batch.lm_targets[r, n:].eq(IGNORE_INDEX).all()
            seen += 1
        assert batch.max_seqlen == batch.input_ids.shape[1]
    assert seen == len(examples)


def test_determinism_epochs_and_resume(shards):
    ds, _ = shards
    run = lambda seed: [b.input_ids for b in PackedLoader(ds, rows=2, seed=seed, epochs=2)]  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    half = len(a) // 2 + 1   # crosses into the second epoch
    first = PackedLoader(ds, rows=2, seed=0, epochs=2)
    it = iter(first)
    for _ in range(half):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))   # survives a JSON round trip
    resumed = PackedLoader(ds, rows=2, seed=0, epochs=2)
    resumed.load_state_dict(state)
    rest = [b.input_ids for b in resumed]
    assert len(rest) == len(a) - half and all(torch.equal(x, y) for x, y in zip(rest, a[half:]))
    with pytest.raises(ValueError, match="rows"):
        PackedLoader(ds, rows=3, seed=0).load_state_dict(state)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_rank_sharding_is_disjoint_and_in_step(shards, mode):
    ds, _ = shards
    world = 3
    loaders = [PackedLoader(ds, rows=2, seed=5, mode=mode, rank=r, world_size=world) for r in range(world)]
    per_rank = [list(loader) for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    single = [b for b in PackedLoader(ds, rows=2 * world, seed=5, mode=mode)]
    for step, global_batch in enumerate(single):
        rows = [per_rank[r][step].input_ids for r in range(world)]
        width = max(x.shape[1] for x in rows)
        if mode == "padded":
            rows = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=PAD_ID) for x in rows]
            global_batch.input_ids = torch.nn.functional.pad(
                global_batch.input_ids, (0, width - global_batch.input_ids.shape[1]), value=PAD_ID)
        assert torch.equal(torch.cat(rows), global_batch.input_ids)
    tokens = [t for batches in per_rank for b in batches for t in b.input_ids.flatten().tolist() if t > 2]
    assert len(tokens) == len(set(tokens))   # past BOS and padding, every id is unique: no row is shared


def test_split_by_query_is_deterministic_and_keeps_queries_together(tmp_path):
    make_shards(tmp_path / "s", [4] * 400)
    ds = ShardDataset(tmp_path / "s")
    train, held = split_by_query(ds, eval_fraction=0.1, seed=0)
    again = split_by_query(ds, eval_fraction=0.1, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])
    assert sorted(train.tolist() + held.tolist()) == list(range(400)) and 5 <= len(held) <= 40
    assert not set(ds.groups[train].tolist()) & set(ds.groups[held].tolist())
    other = split_by_query(ds, eval_fraction=0.1, seed=1)[1]
    assert not np.array_equal(held, other)
    loader = PackedLoader(ds, rows=2, seq_len=16, indices=held)
    assert sum(b.n_tokens for b in loader) == 3 * len(held)


def test_an_example_longer_than_a_row_is_an_error(shards):
    ds, _ = shards
    with pytest.raises(ValueError, match="more than seq_len 32"):
        PackedLoader(ds, seq_len=32)
