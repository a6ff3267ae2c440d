"""The optimizers train.py steps: AdamW (the paper's), or Muon for the decoder's weight matrices beside
AdamW for the rest, each param group with its own peak learning rate on one schedule.

    from slm.optimizers import make_optimizers, set_lr
    optimizers = make_optimizers(model, cfg)      # cfg: train.py's TrainConfig
    set_lr(optimizers, lr_at(step), cfg.lr)       # every group at its peak times the schedule's share
"""

import torch

from .model import OPT
from .muon import Muon


def make_optimizers(model: OPT, cfg, fused: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW over every parameter (the paper's), or with cfg.optimizer "muon", Muon over the decoder layers'
    weight matrices and AdamW over the rest (embeddings, the tied head, biases, LayerNorms).

    Transformers' Trainer (the paper's) exempts biases and LayerNorm weights from weight decay: the 1-D
    parameters here. Embeddings (the tied head included) decay, as they did there. Each param group
    keeps its peak learning rate in "peak_lr"; `set_lr` scales it by the schedule. cfg: train.py's
    TrainConfig (optimizer, lr, muon_lr, weight_decay).

    Why Muon for the smoke model: it orthogonalises each matrix's momentum (Newton-Schulz), so every
    direction of a weight matrix moves at the same rate. The smoke model, from random init with the same
    head start, reached an eval loss of 0.12 in 1,200 steps with it and 0.25 with AdamW (BENCHMARKS.md).
    """
    muon = [p for name, p in model.named_parameters()
            if p.dim() == 2 and name.startswith("layers.")] if cfg.optimizer == "muon" else []
    in_muon = {id(p) for p in muon}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in in_muon]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizers = [torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
         {"params": no_decay, "weight_decay": 0.0, "peak_lr": cfg.lr}],
        lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)]
    if muon:
        qkv = {id(layer.attn.qkv.weight) for layer in model.layers}   # fused q/k/v: three matrices to Muon
        optimizers.append(Muon([{"params": [p for p in muon if id(p) not in qkv], "peak_lr": cfg.muon_lr},
                                {"params": [p for p in muon if id(p) in qkv], "peak_lr": cfg.muon_lr, "blocks": 3}],
                               lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float, peak_lr: float) -> None:
    """The schedule's learning rate `lr` (of peak `peak_lr`) applied to every group from its own peak."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group["peak_lr"] / peak_lr
