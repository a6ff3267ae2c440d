"""Tests of data/prepare.py: shards and stats from real and deliberately broken ToolBench files.

    pytest tests/test_prepare.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.prepare import prepare
from slm.data import ShardDataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SFT = SHARED / "toolbench" / "sft" / "toolllama_dfs_data_example.json"
pytestmark = pytest.mark.skipif(not SFT.is_file() or not (SHARED / "opt" / "merges.txt").is_file(),
                                reason=f"real ToolBench data or OPT tokenizer not found under {SHARED}")


@pytest.fixture(scope="module")
def tok(opt_tokenizer):  # conftest.py's session-wide OPT tokenizer
    return opt_tokenizer


@pytest.mark.parametrize("collapse", [True, False])
@pytest.mark.parametrize("max_len", [2048, 1024])
def test_stats_match_the_shards(tmp_path, tok, collapse, max_len):
    stats = prepare([SFT], tok, tmp_path / "out", max_len=max_len, collapse=collapse, show_progress=False)
    ds = ShardDataset(tmp_path / "out", fingerprint=tok.fingerprint, max_len=max_len)
    assert ds.stats == json.loads(json.dumps(stats))
    assert stats["rows_read"] == stats["rows_used"] == 30 and stats["rows_bad"] == {}
    assert len(ds) == stats["examples"] == sum(stats["examples_by_fit_level"].values())
    assert int(ds.lengths.sum()) == stats["tokens"] and int(ds.lengths.max()) <= max_len
    assert int(ds.mask.sum()) == stats["trained_tokens"]
    assert stats["trained_turns"] + stats["turns_dropped_too_long"] == 30   # one target per row either way
    assert stats["examples_fitted"] == stats["examples"] - stats["examples_by_fit_level"]["original"]
    assert sum(stats["length_histogram"].values()) == stats["examples"]
    for i in range(len(ds)):
        ids, mask = ds[i]
        assert ids[0] == 2 and mask[-1] == 1 and ids[-1] == 2   # every example ends with a trained </s>


def test_same_input_gives_identical_shards(tmp_path, tok):
    for name in ("a", "b"):
        prepare([SFT], tok, tmp_path / name, show_progress=False)
    for name in ("ids.bin", "mask.bin", "offsets.npy", "groups.npy", "stats.json", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path, tok):
    good = json.loads(SFT.read_text())[:6]
    bad_rows = [
        {"id": "Step 1: x", "conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "a"}]},
        {"id": "Step 1: y", "conversations": [{"from": "user", "value": "u"}, {"from": "assistant", "value": ""}]},
        {"id": "Step 1: z", "conversations": [{"from": "user"}, {"from": "assistant", "value": "a"}]},
        {"conversations": [{"from": "assistant", "value": "a"}]},
    ]
    parts = [json.dumps(r) for r in good[:3]] + [json.dumps(r) for r in bad_rows]
    parts += ['{"id": "Step 2: broken", "conversations": [{"from": "user", "value": "no end}]}']
    parts += [json.dumps(r) for r in good[3:]]
    path = tmp_path / "mixed.json"
    path.write_text("[" + ",\n".join(parts) + "]")
    stats = prepare([path], tok, tmp_path / "out", collapse=False, show_progress=False)
    assert stats["rows_bad"] == {"empty_assistant": 1, "malformed_json": 1, "missing_field": 2, "unknown_role": 1}
    assert stats["rows_used"] == stats["examples"] == 6 and stats["rows_read"] == 11
    clean = prepare([SFT], tok, tmp_path / "clean", collapse=False, show_progress=False)
    ds, ref = ShardDataset(tmp_path / "out"), ShardDataset(tmp_path / "clean")
    for i in range(6):
        assert np.array_equal(ds[i][0], ref[i][0]) and np.array_equal(ds[i][1], ref[i][1])
    assert clean["examples"] == 30


def test_dfs_answer_files_prepare_like_the_sft_file(tmp_path, tok):
    dfs = sorted((SHARED / "toolbench" / "trajectories" / "toolbench_dfs").glob("*/*.json"))
    a = prepare(dfs, tok, tmp_path / "dfs", show_progress=False)
    b = prepare([SFT], tok, tmp_path / "sft", show_progress=False)
    keep = ("examples", "tokens", "trained_tokens", "trained_turns", "rows_used")
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}


def test_command_line(tmp_path):
    # As the README runs it: `python -m data.prepare` from the repository root, nothing else on the path.
    out = tmp_path / "cli"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(SFT), "--tokenizer",
                          str(SHARED / "opt"), "--out", str(out), "--max-len", "1536", "--no-collapse"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr
    assert "rows read 30" in run.stdout and ShardDataset(out, max_len=1536).stats["collapse"] is False
    bad = subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(SFT), "--tokenizer",
                          str(SHARED / "opt"), "--out", str(out), "--bogus"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_the_fitting_levels_used_for_real_rows(tmp_path, tok):
    stats = prepare([SFT], tok, tmp_path / "out", max_len=2048, collapse=False, show_progress=False)
    # tests/test_fitting.py pins what each level cuts; here, how many of the 30 sample rows need it
    assert stats["examples_by_fit_level"] == {"original": 15, "short_schema": 5, "obs_512": 1, "min_schema": 4,
                                              "obs_128": 1, "notes_256": 4, "drop_turns": 0}
    assert stats["turns_dropped_too_long"] == 0 and stats["examples_fitted"] == 15
