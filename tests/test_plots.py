"""slm/plots.py: the loss curve and the pass-rate bars are written, and show what they claim.

    python -m pytest -q tests/test_plots.py
"""

import json

import matplotlib.colors
import matplotlib.image
import numpy as np

from slm.plots import LM_SHADE, plot_loss, plot_pass_rate

SHADE = np.array(matplotlib.colors.to_rgb(LM_SHADE))
BAR, OVERALL = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255   # C0, C1


def _pixels(png, rgb) -> int:
    image = matplotlib.image.imread(png)[..., :3]
    return int(np.all(np.abs(image - rgb) < 0.02, axis=-1).sum())


def _metrics(path, lm_steps: int):
    lines = [{"step": s, "loss": 8.0 / s, "objective": "lm" if s <= lm_steps else "turns"} for s in range(1, 41)]
    lines += [{"step": s, "eval_loss": 9.0 / s} for s in (10, 20, 30, 40)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_loss_curve_shades_the_language_model_warm_up(tmp_path):
    plot_loss(_metrics(tmp_path / "warm.jsonl", lm_steps=12), tmp_path / "warm.png")
    plot_loss(_metrics(tmp_path / "cold.jsonl", lm_steps=0), tmp_path / "cold.png")
    image = matplotlib.image.imread(tmp_path / "warm.png")
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50, "a blank or near-blank picture"
    assert _pixels(tmp_path / "warm.png", SHADE) > 5_000
    assert _pixels(tmp_path / "cold.png", SHADE) < 100   # a few anti-aliased edges of the orange line


def test_pass_rate_bars_per_task_type_or_per_subset(tmp_path):
    synthetic = {"suite": "synthetic", "subsets": {},
                 "overall": {"pass_rate": 0.5, "pass_rate_by_type": {"lookup": 1.0, "chain": 0.25}}}
    plot_pass_rate(synthetic, tmp_path / "synthetic.png")
    tall = _pixels(tmp_path / "synthetic.png", BAR)
    synthetic["overall"]["pass_rate_by_type"] = {"lookup": 0.5, "chain": 0.25}
    plot_pass_rate(synthetic, tmp_path / "lower.png")
    assert tall > _pixels(tmp_path / "lower.png", BAR) > 0, "bar heights must follow the rates"

    per_subset = {"suite": "stabletoolbench", "overall": {"offline_pass_rate": 0.3},
                  "subsets": {"G1_instruction": {"offline_pass_rate": 0.4}, "G2_category": {"offline_pass_rate": None}}}
    plot_pass_rate(per_subset, tmp_path / "subsets.png")
    assert _pixels(tmp_path / "subsets.png", BAR) > 0 and _pixels(tmp_path / "subsets.png", OVERALL) > 0
