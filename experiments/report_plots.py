"""The report's PNG plots: metrics vs round, each arm paired with the control, metrics vs T and vs training-set size.

Each function draws for a `Report`, saves the figure under its plots folder and returns the markdown that shows it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import matplotlib
from collect import Cell
from report_arms import arm_label

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from report import Report


def _save(rep: Report, fig, name: str, title: str) -> str:
    os.makedirs(rep.plots_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(rep.plots_dir, name), dpi=110)
    plt.close(fig)
    rep.plots.append(name)
    return f"![{title}]({rep.plots_rel}/{name})\n"


def _series(rep: Report, metric: str, cell: Cell):
    pts = [(t, rep.cell_stat(metric, cell, t)) for t in rep.rounds(cell)]
    pts = [(t, s) for t, s in pts if s and s.n]
    return [t for t, _ in pts], [s.mean for _, s in pts], [s.std for _, s in pts]


def plot_vs_round(rep: Report, cells: list[Cell], name: str, title: str, by_T: bool = False) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
        for c in cells:
            x, y, e = _series(rep, metric, c)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"T={c.T:g}" if by_T else arm_label(c))
        ax.set_xlabel("round (0 = SFT start)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (mean ± std over seeds)")
    return _save(rep, fig, name, title)


def plot_paired(rep: Report, arms: list[Cell], control: Cell) -> str:
    """Each arm minus the control at the last round both have, per seed: mean ± std as horizontal bars."""
    others = [c for c in arms if c != control]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(others) + 1.6), sharey=True)
    for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
        stats, labels = [], []
        for c in others:
            last = max(set(rep.rounds(c)) & set(rep.rounds(control)))
            stats.append(rep.paired(metric, c, last, control, last))
            labels.append(f"{arm_label(c)}, round {last}")
        y = range(len(others))
        ax.barh(y, [s.mean for s in stats], xerr=[s.std for s in stats], capsize=3, color="tab:blue", alpha=0.7)
        ax.axvline(0, color="gray", lw=1)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_xlabel(f"{metric}: arm − SFT control")
        ax.grid(alpha=0.3, axis="x")
    axes[0].invert_yaxis()  # the table's order, top down (the y axis is shared: invert it once)
    fig.suptitle("paired by seed: each arm minus continued SFT at the same round (mean ± std over seeds)")
    return _save(rep, fig, "paired_vs_control.png", "each arm minus continued SFT")


def _errorbar(ax, xs: list, stats: list, **style) -> None:
    """Mean ± std over seeds at each x."""
    ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std for s in stats], marker="o", capsize=3, **style)


def _log_x_axes(ax, xlabel: str, metric: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def plot_vs_T(rep: Report, by_arm: dict[str, list[Cell]]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
        for label, cells in by_arm.items():
            last = max(set.intersection(*(set(rep.rounds(c)) for c in cells)))
            stats = [rep.cell_stat(metric, c, last) for c in cells]
            _errorbar(ax, [c.T for c in cells], stats, label=f"{label}, round {last}")
        start = rep.cell_stat(metric, next(iter(by_arm.values()))[0], 0)
        if start:
            ax.axhline(start.mean, color="gray", ls="--", label="SFT start")
        _log_x_axes(ax, "T", metric)
    axes[0].legend(fontsize=8)
    fig.suptitle("metric vs T per arm (mean ± std over seeds)")
    return _save(rep, fig, "vs_T.png", "metric vs T")


def plot_size(rep: Report, arms: list[Cell], modes: list[str], sizes: list[int]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
        first = [next(c for c in arms if c.num_train == n and c.mode == modes[0]) for n in sizes]
        s0 = [rep.cell_stat(metric, c, 0) for c in first]
        _errorbar(ax, sizes, s0, color="gray", ls="--", label="SFT start")
        for m in modes:
            cells = [next(c for c in arms if c.num_train == n and c.mode == m) for n in sizes]
            last = max(set.intersection(*(set(rep.rounds(c)) for c in cells)))
            st = [rep.cell_stat(metric, c, last) for c in cells]
            _errorbar(ax, sizes, st, label=f"{arm_label(cells[0])} round {last}")
        _log_x_axes(ax, "training prompts", metric)
    axes[0].legend(fontsize=8)
    fig.suptitle("training-set size (mean ± std over seeds)")
    return _save(rep, fig, "train_size.png", "training-set size")
