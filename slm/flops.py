"""Training FLOPs of the model and the GPUs' peaks, for MFU (PaLM, arXiv 2204.02311, appendix B).

    from slm import flops
    flops.flops_per_token(model, seq_len)       # 6*N_mm + 12*L*d*T
    flops.peak_flops(torch.device("cuda"))      # 989e12 on an H100 SXM; None off CUDA or for an unlisted GPU

train.py logs MFU with these; bench/train_step.py and bench/gpu_check.py report it.
"""

import re

import torch

from .model import OPT

# Dense (not sparse) bf16/fp16 tensor-core peaks from NVIDIA's datasheets, for MFU (PaLM, arXiv 2204.02311,
# appendix B), by a word of torch.cuda.get_device_name, the most specific first: "NVIDIA H100 PCIe",
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA A10G" (AWS's A10 variant, which has no datasheet of its own: the
# A10's figure), "NVIDIA L4" (a whole word, so never an L40).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "A10G": 125e12, "L4": 121e12}
# A 8192^3 bf16 matmul reaches about 790 TFLOP/s on an H100 SXM in practice (bench/train_step.py's second ratio).
PRACTICAL_H100_FLOPS = 790e12


def flops_per_token(model: OPT, seq_len: int) -> float:
    """Training FLOPs per token, 6*N_mm + 12*L*d*T (PaLM's MFU, arXiv 2204.02311 appendix B): N_mm counts
    the weights used in matmuls (every Linear and the tied head, not the position table); the second
    term is attention's."""
    n_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_mm += model.lm_head_weight.numel()
    c = model.config
    return 6 * n_mm + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16/fp16 peak (PEAK_FLOPS), or None off CUDA and for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)
