"""Load time and peak memory of `slm.load_model` on an opt-350m-shaped checkpoint in the hub's layout.

    python bench/load_model.py [--dtype float32] [--dir /tmp/opt350m-random]

Writes a random checkpoint shaped like facebook/opt-350m's hub file (fp16, `decoder.*` keys, no
lm_head) unless one exists, then loads it in a fresh process and prints wall time and peak RSS. The
floor for comparison is the size of the weights in the requested dtype: meta-device construction
means the model is never materialised twice. From Python: `run(directory, dtype)` returns the figures.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for slm and bench
from bench import harness  # noqa: E402, F401  (takes bench/ off sys.path)
import slm  # noqa: E402
from slm.weights import to_hf  # noqa: E402


def write_checkpoint(directory: Path) -> None:
    config = slm.OPTConfig.preset("opt-350m")
    model = slm.OPT(config)
    model.init_weights(seed=0)
    state = {k.removeprefix("model."): v.half().contiguous() for k, v in to_hf(model.state_dict()).items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))


def measure(directory: str, dtype: str) -> dict:
    """Loads the checkpoint in this process: seconds, this process's peak RSS, the weights' bytes."""
    start = time.perf_counter()
    model = slm.load_model(directory, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_s": round(seconds, 2), "peak_rss_gb": round(peak / 1e9, 2), "weights_gb": round(weights / 1e9, 2),
            "params": model.num_parameters(), "dtype": dtype}


def run(directory: str = "/tmp/opt350m-random", dtype: str = "float32") -> dict:
    """`measure` in a fresh process (after writing the checkpoint if `directory` has none), with
    "import_peak_rss_gb": the peak RSS of a process that only imports torch and slm."""
    if not (Path(directory) / "model.safetensors").is_file():
        write_checkpoint(Path(directory))
    baseline = subprocess.run([sys.executable, "-c", "import resource, torch, slm; print(resource.getrusage("
                               "resource.RUSAGE_SELF).ru_maxrss * 1024)"], capture_output=True, text=True, check=True)
    child = subprocess.run([sys.executable, __file__, "--child", "--dir", directory, "--dtype", dtype],
                           capture_output=True, text=True, check=True)
    return {**json.loads(child.stdout.splitlines()[-1]), "import_peak_rss_gb": round(int(baseline.stdout) / 1e9, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/opt350m-random", help="checkpoint directory (created if absent)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.dir, args.dtype)))
    else:
        result = run(args.dir, args.dtype)
        print(f"interpreter + torch + slm imported: peak RSS {result.pop('import_peak_rss_gb'):.2f} GB")
        print(json.dumps(result))
