"""Pictures of a run (stand-in: helper A's slm/plots.py replaces this file at merge).

    plot_pass_rate(results, "eval/pass_rate.png")   # evaluate.py's results.json as a dict
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def plot_pass_rate(results: dict, png) -> None:
    """Bars of the pass rate per synthetic task type, or of the offline pass rate per subset."""
    rates = results["overall"].get("pass_rate_by_type") or {
        name: m["offline_pass_rate"] for name, m in results["subsets"].items()}
    fig, ax = plt.subplots(figsize=(max(4, len(rates)), 3))
    ax.bar(list(rates), [rate or 0.0 for rate in rates.values()])
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass rate")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
