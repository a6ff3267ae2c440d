"""bench/gpu_check.py on CPU: the dry run covers every section, and a section that hangs is cut off alone.

    PYTHONPATH=$PWD python -m pytest -q tests/test_gpu_check.py     # ~1 min of CPU on 2 cores (the dry run: slow)

The dry run is the GPU check's own code with tiny shapes: attention through Triton's interpreter, a tiny
OPT's training step against transformers', greedy decoding against generate(), a train.py run killed
and resumed. What a CPU can run must pass here, so the one GPU run is not where its bugs show up.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import gpu_check  # noqa: E402

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), "--dry-run"],
                          capture_output=True, text=True, cwd=REPO)
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text()), (out / "summary.md").read_text()


@pytest.mark.slow
def test_dry_run_covers_every_section_and_what_a_cpu_can_run_passes(dry_run):
    proc, report, summary = dry_run
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, section in sections.items():
        assert section["status"] == "passed", f"{name}: {section.get('error', section['status'])}"
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert report["meta"]["dry_run"] and report["meta"]["commit"] and report["meta"]["torch"]
    for name in gpu_check.SECTIONS:
        assert f"| {name} | {sections[name]['status']} |" in summary


@pytest.mark.slow
def test_dry_run_measures_each_side_and_checks_correctness_first(dry_run):
    _, report, _ = dry_run
    attention, train_step, decode, resume = (report["sections"][k] for k in ("attention", "train_step", "decode",
                                                                             "resume"))
    assert [c["layout"] for c in attention["checks"]] == ["dense", "varlen"]
    assert all(c["ok"] for c in attention["checks"])
    assert {r["impl"] for r in attention["rows"]} >= {"triton", "sdpa-flash", "triton varlen"}
    assert all(r["fwd_tflops"] > 0 for r in attention["rows"] if "error" not in r)
    step = train_step["by_dtype"]["bf16"]
    assert step["losses_agree"] and [r["name"] for r in step["rows"]][-1] == "transformers sdpa, padded"
    assert all(r["tok_s"] > 0 for r in step["rows"])
    assert [r["batch"] for r in decode["runs"]] == [1, 4] and all(r["equal_token_share"] == 1 for r in decode["runs"])
    assert all(r["compiled_equal_to_ours"] for r in decode["runs"])
    # The kill came after the half-way checkpoint, and the resumed run logged the unkilled run's losses.
    assert resume["killed_after_logged_step"] >= resume["checkpoint_step"] == resume["steps"] // 2
    assert resume["equal_after_resume"] and len(resume["losses_resumed"]) == resume["steps"]


def test_a_section_past_its_timeout_is_stopped_and_recorded():
    result = gpu_check.run_section("resume", dry=True, timeout=1)
    assert result["status"] == "failed" and "timed out after 1 s" in result["error"]


def test_a_section_that_raises_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_check.SECTION_RUNNERS, "decode", broken)
    gpu_check.run_worker("decode", dry=True, result_path=tmp_path / "decode.json")
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["status"] == "failed" and "illegal memory access" in result["error"]
    assert "Traceback" in result["error"] and result["environment"]["commit"]


def test_unknown_section_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "attention,warp_speed"])
    assert "unknown section(s) warp_speed" in capsys.readouterr().err
