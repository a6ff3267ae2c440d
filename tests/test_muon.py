"""slm/muon.py: the Newton-Schulz orthogonalisation against an SVD, and Muon's update rule."""

import pytest
import torch

from slm.muon import Muon, newton_schulz


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 80)])
def test_newton_schulz_approximates_the_orthogonal_factor(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5.0
    out = newton_schulz(g)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh                                        # what exact orthogonalisation would give
    singular = torch.linalg.svdvals(out)
    # The quintic iteration trades exactness for speed: singular values land near 1, not on it.
    assert 0.5 <= singular.min() and singular.max() <= 1.5, singular
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert cosine > 0.97, cosine
    assert torch.allclose(newton_schulz(g * 1e-3), out, atol=1e-4)   # depends on g's direction only


def test_update_ignores_the_gradient_scale_and_widens_for_tall_matrices():
    torch.manual_seed(0)
    wide, tall = torch.nn.Parameter(torch.zeros(16, 64)), torch.nn.Parameter(torch.zeros(64, 16))
    small, large = torch.nn.Parameter(torch.zeros(16, 64)), torch.nn.Parameter(torch.zeros(16, 64))
    grad = torch.randn(16, 64)
    wide.grad, tall.grad, small.grad, large.grad = grad, grad.T.clone(), grad * 1e-4, grad * 1e4
    Muon([wide, tall, small, large], lr=0.1, momentum=0.9).step()
    # One step from an empty buffer: U = (1 + momentum) G, orthogonalised, times lr (x 2 for 64 x 16).
    assert torch.allclose(wide, -0.1 * newton_schulz(1.9 * grad), atol=1e-6)
    assert torch.allclose(tall, -0.1 * 2.0 * newton_schulz(1.9 * grad).T, atol=1e-6)
    assert torch.allclose(small, large, atol=1e-5)


def test_muon_fits_a_linear_map_and_rejects_vectors():
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(256, 32, generator=g), torch.randn(32, 32, generator=g) / 32 ** 0.5
    weight = torch.nn.Parameter(torch.zeros(32, 32))
    optimizer = Muon([weight], lr=0.02)
    losses = []
    for step in range(300):
        for group in optimizer.param_groups:          # decay the rate, as train.py's schedule does
            group["lr"] = 0.02 * (1 - step / 300)
        loss = (x @ weight.T - x @ target.T).pow(2).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 1e-3 * losses[0], losses[::50]
    with pytest.raises(ValueError, match="weight matrices"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def test_blocks_orthogonalise_a_fused_matrix_as_separate_ones():
    """A (3n, n) fused q/k/v weight with blocks=3 takes the steps of three (n, n) weights (slm/model.py)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(48, 16, generator=g)
    fused = torch.nn.Parameter(start.clone())
    parts = [torch.nn.Parameter(block.clone()) for block in start.chunk(3)]
    whole = torch.nn.Parameter(start.clone())
    optimizers = [Muon([fused], lr=0.1, weight_decay=0.01, blocks=3), Muon(parts, lr=0.1, weight_decay=0.01),
                  Muon([whole], lr=0.1, weight_decay=0.01)]
    for _ in range(3):
        grad = torch.randn(48, 16, generator=g)
        fused.grad, whole.grad = grad.clone(), grad.clone()
        for part, block in zip(parts, grad.chunk(3)):
            part.grad = block.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts]))
    assert (whole - fused).abs().max() > 1e-3        # the stacked matrix's own orthogonalisation differs
    with pytest.raises(ValueError, match="blocks=5"):
        Muon([torch.nn.Parameter(torch.zeros(48, 16))], blocks=5)
