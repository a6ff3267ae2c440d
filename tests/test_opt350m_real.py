"""Hugging Face's expected outputs for the real facebook/opt-350m weights (docs/OPT.md section 3).

Runs when SLM_OPT350M_DIR names a downloaded checkpoint directory, e.g.
    huggingface-cli download facebook/opt-350m --local-dir ~/opt-350m
    SLM_OPT350M_DIR=~/opt-350m pytest tests/test_opt350m_real.py
"""

import os

import pytest
import torch

import slm

CHECKPOINT = os.environ.get("SLM_OPT350M_DIR")
pytestmark = pytest.mark.skipif(
    not CHECKPOINT, reason="set SLM_OPT350M_DIR to a facebook/opt-350m checkpoint directory to run")


@pytest.fixture(scope="module")
def model():
    return slm.load_model(CHECKPOINT, dtype=torch.float32)


def test_inference_no_head(model):
    ids = torch.tensor([[0, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588, 2]])
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
    assert hidden.shape == (1, 11, 512)
    expected = torch.tensor([[-0.28726277, -1.9241608, -0.3058734],
                             [-1.2737825, -0.13332152, -0.18766522],
                             [0.41159445, 0.1191957, -1.3107123]])
    torch.testing.assert_close(hidden[0, :3, :3], expected, atol=5e-5, rtol=0)


def test_logits_mean(model):
    ids = torch.tensor([[5625, 16, 10, 2721, 183, 8, 38, 236, 7],
                        [1121, 5, 343, 9, 1, 1, 1, 1, 1],
                        [32826, 16, 5, 812, 9, 1470, 8, 1, 1],
                        [14721, 43990, 8, 1830, 4247, 33, 551, 1, 1]])
    with torch.no_grad():
        means = model(ids, (ids != 1).long()).mean(dim=-1)
    expected = torch.tensor([
        [1.3851, -13.8923, -10.5229, -10.7533, -0.2309, -10.2384, -0.5365, -9.0947, -5.1670],
        [-4.7073, -10.6276, -3.9415, -21.5242, -0.2822, -0.2822, -0.2822, -0.2822, -0.2822],
        [0.6247, -3.4229, -8.9179, -1.4297, -14.1650, 1.4146, -9.0218, -0.2703, -0.2703],
        [6.4783, -1.9913, -10.7926, -2.3336, 1.5092, -0.9974, -6.8213, 1.3477, 1.3477]])
    torch.testing.assert_close(means, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt,new", [
    ([2, 5625, 16, 10, 2721, 183, 8, 38, 236], [7]),
    ([2, 1121, 5, 343, 9], [764, 2659, 6, 5, 343]),
    ([2, 32826, 16, 5, 812, 9, 1470, 8], [5, 812]),
    ([2, 14721, 43990, 8, 1830, 4247, 33, 551], [81, 5]),
])
def test_greedy_generation(model, prompt, new):
    out = slm.generate(model, [prompt], max_new_tokens=10 - len(prompt))
    assert out[0][: len(new)] == new


def test_batch_generation_with_left_padding(model):
    prompts = [[2, 31414, 6, 127, 2335, 16, 10, 410], [2, 5625, 6, 38]]
    out = slm.generate(model, prompts, max_new_tokens=12)
    assert out[0] == [828, 9, 10, 385, 9657, 4, 50118, 100, 437, 10, 410, 828]
    assert out[1] == [21, 11, 5, 1692, 9, 10, 1607, 19, 10, 1441, 59, 5]
