"""The per-run picture: held-out metrics against the round, one line per self-play arm.

Every arm starts from the SFT policy, so each line begins at the SFT row (round 0).
"""

from __future__ import annotations

import io
from typing import Any

from etils import epath

METRICS = (("exact_match", "held-out exact match"), ("answer_logp", "answer log-likelihood (nats)"))


def arm_curves(table: list[dict[str, Any]], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{arm: (rounds, values)} from the evaluation rows (fields `arm`, `round`; round 0 is the SFT start)."""
    start = next((row.get(metric) for row in table if row["round"] == 0), None)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for row in table:
        if row["round"] == 0 or metric not in row:
            continue
        rounds, values = curves.setdefault(row["arm"], ([0], [start]) if start is not None else ([], []))
        rounds.append(int(row["round"]))
        values.append(row[metric])
    return curves


def harness_metrics(table: list[dict[str, Any]]) -> list[str]:
    """The config.eval.harness metrics of the evaluation rows ("harness/<task>/<metric>[/<filter>]"), their stderr
    left out: a results-table column and a plot panel each."""
    return sorted({k for row in table for k in row if k.startswith("harness/") and "_stderr" not in k})


def plot_rounds(table: list[dict[str, Any]], path: str) -> bool:
    """Writes a PNG with one panel per metric the table has (to a local or gs:// path); False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [*METRICS, *((k, k.removeprefix("harness/")) for k in harness_metrics(table))]
    panels = [(m, label) for m, label in named if arm_curves(table, m)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        for arm, (rounds, values) in sorted(arm_curves(table, metric).items()):
            ax.plot(rounds, values, marker="o", label="continued SFT" if arm == "sft" else arm)
        ax.set_xlabel("round (0 = SFT start)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    epath.Path(path).write_bytes(png.getvalue())
    return True
