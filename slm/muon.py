"""Muon: SGD momentum whose update is orthogonalised, for the weight matrices of hidden layers.

    optimizer = Muon(matrices, lr=0.005, momentum=0.95, weight_decay=0.01)

Each step, per matrix W (out x in) with gradient G:
    B <- momentum * B + G                         (momentum buffer)
    U <- G + momentum * B                         (Nesterov)
    O <- newton_schulz(U) ~ the nearest semi-orthogonal matrix (U's singular values pushed towards 1)
    W <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, out / in)) * O
so every direction of a weight matrix moves at the same rate, however unevenly the gradient spreads
over them. Embeddings, the LM head, biases and norms belong to AdamW (train.py sets both up).

A fused projection is several matrices to Muon: a param group with blocks=3 (the model's q/k/v projection,
(3d, d)) orthogonalises each of its 3 row blocks on its own, as separate q, k, v weights would be (the
modded-nanogpt way); the orthogonal factor of the stacked matrix would couple them.

K. Jordan et al., "Muon: an optimizer for hidden layers in neural networks" (2024); the quintic
Newton-Schulz coefficients are theirs. torch.optim.Muon computes the same update in bfloat16, which CPUs
without bf16 units run far slower than float32 (the smoke model trains on such CPUs); this one works
in float32.
"""

import torch

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # quintic coefficients: steep at 0, so 5 steps suffice


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """U S' Vᵀ for a matrix g = U S Vᵀ, with S' between about 0.5 and 1.5: an approximate orthogonalisation."""
    a, b, c = NEWTON_SCHULZ
    x = g.float()
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T                                   # iterate on the smaller Gram matrix x xᵀ
    x = x / (x.norm() + eps)                      # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (see the module docstring). Param groups take lr, momentum, weight_decay
    and blocks (each matrix is that many equal row blocks, orthogonalised one by one; default 1)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, blocks: int = 1):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                                      blocks=blocks))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes weight matrices; got a parameter of shape {tuple(p.shape)}")
                if p.shape[0] % group["blocks"]:
                    raise ValueError(f"Muon: a {tuple(p.shape)} matrix does not split into blocks="
                                     f"{group['blocks']} equal row blocks")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(p.grad)
                nesterov = p.grad.add(buffer, alpha=momentum)
                update = torch.cat([newton_schulz(block, group["ns_steps"])
                                    for block in nesterov.chunk(group["blocks"])])
                rows = p.shape[0] // group["blocks"]                 # one block's shape sets its scale
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, rows / p.shape[1]) ** 0.5)
        return loss
