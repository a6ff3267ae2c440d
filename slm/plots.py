"""Pictures of a run: the loss curve train.py draws and the pass rates evaluate.py draws.

    plot_loss("runs/smoke/metrics.jsonl", "runs/smoke/loss.png")   # train and eval loss against the step
    plot_pass_rate(results, "eval/pass_rate.png")                   # evaluate.py's results.json, as a dict

matplotlib draws with its file-only Agg backend, so this works on a machine without a display.
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (pyplot after the backend is chosen)
from matplotlib.ticker import FuncFormatter  # noqa: E402

LM_SHADE = "#fdebd0"   # the language-modelling warm-up's band, a colour nothing else in the picture uses
_PLAIN = FuncFormatter(lambda y, _: f"{y:g}")   # 0.5, 2, 8 rather than 5x10^-1 on a log axis
# Minor ticks labelled at 2 and 5 of each decade only: all nine overlap once the axis spans three decades.
_TWO_AND_FIVE = FuncFormatter(lambda y, _: f"{y:g}" if y > 0 and round(y / 10 ** math.floor(math.log10(y))) in (2, 5)
                              else "")


def plot_loss(metrics_jsonl, png) -> None:
    """Train loss and eval loss against the step from train.py's metrics.jsonl; the language-modelling
    warm-up (records with objective "lm", whose loss covers every token) is shaded."""
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    lm_steps = [r["step"] for r in train if r.get("objective") == "lm"]
    if lm_steps:
        ax.axvspan(0, max(lm_steps), color=LM_SHADE, label="LM warm-up (loss on every token)")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3,
                label="eval loss (trained turns)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_yscale("log")   # the smoke run falls from ~8 to ~0.1: a linear axis hides everything after step 100
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.yaxis.set_minor_formatter(_TWO_AND_FIVE)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_pass_rate(results: dict, png) -> None:
    """Bars of the pass rate per task type (synthetic suite), BFCL's accuracy per category (bfcl suite)
    or the offline pass rate per subset (other suites), from evaluate.py's results; a rate that could not be computed (no queries) is drawn as 0
    and labelled n/a."""
    overall = results["overall"]
    if results.get("suite") == "bfcl":
        rates, what = {name: m.get("accuracy") for name, m in results["subsets"].items()}, "BFCL accuracy"
    elif overall.get("pass_rate_by_type"):
        rates, what = {**overall["pass_rate_by_type"], "all": overall.get("pass_rate")}, "pass rate"
    else:
        rates = {name: m.get("offline_pass_rate") for name, m in results["subsets"].items()}
        rates["all"] = overall.get("offline_pass_rate")
        what = "offline pass rate"
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(rates)), 3.5))
    bars = ax.bar(list(rates), [rate or 0.0 for rate in rates.values()],
                  color=["C0"] * (len(rates) - 1) + ["C1"])
    ax.bar_label(bars, labels=["n/a" if rate is None else f"{rate:.2f}" for rate in rates.values()])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(what)
    ax.set_title(f"{results.get('suite', '')} {what}".strip())
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
