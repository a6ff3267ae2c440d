"""Where a benchmark's or an evaluation's figures came from, for its report: the device's name and the commit.

    from slm import provenance
    provenance.device_name("cuda")    # "NVIDIA H100 80GB HBM3"; off CUDA the CPU's model name
    provenance.git_commit()           # "c9c551f", "c9c551f-dirty" with uncommitted changes, or "unknown"
"""

import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device | str) -> str:
    """torch.cuda.get_device_name for a CUDA device; otherwise the CPU's model name (a CPU figure means
    little without it), from /proc/cpuinfo on Linux and platform.processor() elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def git_commit() -> str:
    """The checked-out commit, "-dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
