"""`slm` is the only name the project installs and imports: its kernels are `slm.kernels`, and the top-level
name `kernels` stays Hugging Face's package, which transformers (>= 5.25) imports at start-up.

    pytest tests/test_import_name.py

Each check runs in a fresh interpreter, from a folder outside the checkout and from the repository root
(where a top-level kernels/ package of ours would shadow Hugging Face's), with the installed project.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from conftest import REPO, shared_path

# In one process: slm's registry, an OPT forward and backward through every implementation that runs on a
# CPU without Triton's interpreter, transformers' OPT built beside it, and which `kernels` Python imports.
SAME_PROCESS = """
import json, torch, slm
from slm import kernels
config = slm.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                       max_position_embeddings=32, word_embed_proj_dim=16, do_layer_norm_before=False)
ids = torch.randint(0, 64, (2, 9))
ran = []
for op, names in kernels.available().items():
    for name in names:
        if name == "triton":   # needs a GPU, or TRITON_INTERPRET=1 before triton is imported
            continue
        model = slm.OPT(config, kernels={op: name})
        hidden = model(ids, return_hidden=True)
        loss = model.kernel("linear_cross_entropy")(hidden[:, :-1].flatten(0, 1), model.lm_head_weight,
                                                   ids[:, 1:].flatten(), reduction="sum")
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters()), (op, name)
        ran.append(f"{op}={name}")
from transformers import OPTConfig, OPTForCausalLM
OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64))
import importlib
hub_kernels = importlib.import_module("kernels")   # the top-level name: Hugging Face's package, never ours
print(json.dumps({"ran": ran, "kernels_file": hub_kernels.__file__,
                  "has_hub_api": hasattr(hub_kernels, "CUDAProperties"), "slm_kernels": list(kernels.__path__)}))
"""


def run_python(script: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("where", ["outside the checkout", "repository root"])
def test_slm_kernels_and_hugging_faces_kernels_in_one_process(tmp_path, where):
    cwd = tmp_path if where == "outside the checkout" else REPO
    result = run_python(SAME_PROCESS, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["ran"] == ["attention=eager", "attention=sdpa", "layer_norm=torch", "linear_cross_entropy=torch"]
    assert seen["has_hub_api"], f"`import kernels` gave {seen['kernels_file']}, not Hugging Face's package"
    assert not Path(seen["kernels_file"]).resolve().is_relative_to(REPO / "kernels"), seen["kernels_file"]
    assert Path(seen["slm_kernels"][-1]).resolve() == REPO / "kernels"


def test_no_top_level_kernels_package_in_the_checkout():
    """A kernels/__init__.py would make the folder a regular package that wins over Hugging Face's from the root."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "slm" / "kernels" / "__init__.py").exists()


def test_readme_library_example_runs_from_any_directory(tmp_path):
    """The README's "Using the library" block, as written, with its model path pointing at a small checkpoint."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using the library", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"~/models/opt-350m"' in block
    checkpoint = tmp_path / "opt-small"
    make_checkpoint(checkpoint, dict(vocab_size=50272, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     ffn_dim=32, max_position_embeddings=64))
    for name in ("vocab.json", "merges.txt"):
        (checkpoint / name).write_bytes(shared_path("opt", name).read_bytes())
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = run_python(block.replace('"~/models/opt-350m"', repr(str(checkpoint))), work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "out" / "model.safetensors").exists() and "attention" in result.stdout


def test_the_wheel_installs_slm_only(tmp_path):
    """`pip wheel` of the checkout holds one top-level package, slm, with the kernels folder's modules as
    slm.kernels; installed alone (no checkout on the path), its registry works."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in files:   # a copy, so the build leaves nothing behind in the checkout
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("slm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"slm", wheel.name.split("-py")[0] + ".dist-info"}
    shipped = {name.removeprefix("slm/kernels/") for name in names if name.startswith("slm/kernels/")}
    assert shipped == {"__init__.py"} | {path.name for path in (REPO / "kernels").glob("*.py")}

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    result = run_python("import json; from slm import kernels; "
                        "print(json.dumps([list(kernels.__path__), kernels.available()]))", tmp_path,
                        PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr[-3000:]
    path, available = json.loads(result.stdout)
    assert [Path(p).resolve() for p in path] == [(site / "slm" / "kernels").resolve()]
    assert available["attention"][:2] == ["eager", "sdpa"] and available["layer_norm"][0] == "torch"
