"""The smoke preset's head starts (slm/smoke.py): what each one does, and that a seed fixes them.

Run: pytest tests/test_smoke_start.py
"""

import math

import pytest
import torch

import slm
from checkpoints import TINY_CONFIGS
from slm import smoke

FIT_CONFIG = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                  max_position_embeddings=512)


@pytest.fixture(scope="module", params=[True, False], ids=["pre-ln", "post-ln"])
def plain_and_fitted(request):
    """Two models from seed 0 with sinusoidal positions, the second with heads 0, 1 fitted to offsets 1, 2."""
    config = slm.OPTConfig(**FIT_CONFIG, do_layer_norm_before=request.param)
    plain, fitted = slm.OPT(config), slm.OPT(config)
    smoke.init_weights(plain, 0, position_rms=0.05)
    smoke.init_weights(fitted, 0, position_rms=0.05, offset_heads=(1, 2))
    return plain, fitted


def test_sinusoidal_positions_make_one_step_back_one_linear_map():
    # The point of the option: one rotation R (angle w per sin/cos pair) takes every row to the next.
    config = slm.OPTConfig(**TINY_CONFIGS["pre_ln"])
    width = config.hidden_size
    w = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    step = torch.zeros(width, width, dtype=torch.float64)
    for k in range(width // 2):
        c, s = math.cos(w[k]), math.sin(w[k])
        step[2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.tensor([[c, -s], [s, c]])
    model = slm.OPT(config)
    smoke.init_weights(model, 0, position_rms=0.05)
    table = model.pos_embed.weight.detach().double()
    assert torch.allclose(table.pow(2).mean().sqrt(), torch.tensor(0.05).double(), rtol=1e-3)
    assert (table[:-1] @ step - table[1:]).abs().max() < 1e-5 * table.abs().max()
    assert (table[2] - table[1] @ step).abs().max() < 1e-5   # row 2 is position 0: sin 0, cos 0
    assert torch.allclose(table[2, 0::2], torch.zeros(width // 2).double()) and torch.allclose(
        table[2, 1::2], torch.full((width // 2,), 0.05 * math.sqrt(2.0)).double())
    model.init_weights(seed=0)                            # OPT's N(0, std) rows: no such map
    table = model.pos_embed.weight.detach().double()
    assert (table[:-1] @ step - table[1:]).abs().max() > 0.5 * table.abs().max()


def layer0_attention(model, start: int, length: int = 96) -> torch.Tensor:
    """Layer 0's attention probabilities (B, H, T, T) over random tokens at positions start..start+T-1."""
    c, layer = model.config, model.layers[0]
    ids = torch.randint(3, c.vocab_size, (2, length), generator=torch.Generator().manual_seed(start))
    with torch.no_grad():
        x = model.embed(ids, torch.arange(start, start + length).expand(2, length))
        x = layer.attn_norm(x) if layer.pre_ln else x
        q, k, _ = layer.attn.qkv(x).view(2, length, 3, c.num_attention_heads, c.head_dim).unbind(2)
        q, k = (t.transpose(1, 2) for t in (q * layer.attn.scale, k))     # (B, H, T, hd)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(),
                                                       float("-inf"))
    return scores.softmax(-1)


def test_offset_heads_attend_their_offset_and_nothing_else_changes(plain_and_fitted):
    plain, fitted = plain_and_fitted
    for start in (0, 200, 400):            # everywhere in the position table, not just where it starts
        for model in (fitted, plain):
            probs = layer0_attention(model, start)
            for head, offset in enumerate((1, 2)):
                at_offset = torch.diagonal(probs[:, head], -offset, dim1=-2, dim2=-1)[:, 8:].mean().item()
                if model is fitted:
                    assert at_offset >= 0.6, f"fitted head {head}, offset {offset}, start {start}: {at_offset}"
                else:                      # an unfitted head spreads out: far below the fitted floor
                    assert at_offset < 0.2, f"plain head {head}, offset {offset}, start {start}: {at_offset}"
    # Only the q and k rows of the two fitted heads differ: rows [0, 2hd) and [d, d + 2hd) of the fused qkv.
    d, width = plain.config.hidden_size, 2 * plain.config.head_dim
    fitted_rows = torch.zeros(3 * d, dtype=torch.bool)
    fitted_rows[:width] = fitted_rows[d:d + width] = True
    for (name, p), q in zip(fitted.named_parameters(), plain.parameters()):
        if name == "layers.0.attn.qkv.weight":
            assert (p != q).any(dim=1).equal(fitted_rows), "the fitted rows are q's and k's of heads 0, 1"
        else:
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="offset_heads"):
        smoke.init_weights(slm.OPT(plain.config), 0, position_rms=None, offset_heads=(1, 2, 3, 4, 5))


def test_a_seed_fixes_the_weights_and_another_seed_changes_them(plain_and_fitted):
    """The smoke run's figures depend on its seed alone: the random init, the position table and the fit
    draw the same from the same seed, and OPT.init_weights draws the same from a seed as from a generator
    seeded with it."""
    plain, fitted = plain_and_fitted
    again, other = slm.OPT(fitted.config), slm.OPT(fitted.config)
    smoke.init_weights(again, 0, position_rms=0.05, offset_heads=(1, 2))
    smoke.init_weights(other, 1, position_rms=0.05, offset_heads=(1, 2))
    assert all(torch.equal(a, b) for a, b in zip(fitted.parameters(), again.parameters()))
    assert not torch.equal(fitted.layers[0].attn.qkv.weight, other.layers[0].attn.qkv.weight)
    from_generator = slm.OPT(plain.config)
    from_generator.init_weights(generator=torch.Generator().manual_seed(0))
    from_seed = slm.OPT(plain.config)
    from_seed.init_weights(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(from_generator.parameters(), from_seed.parameters()))
