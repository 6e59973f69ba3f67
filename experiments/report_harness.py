"""The report's benchmark section: lm-evaluation-harness scores (config.eval.harness) per arm and round.

A column per task metric. With several seeds a cell is mean ± std over seeds, as in the rest of the report; with
one seed it is the score ± lm-eval's own standard error (marked "se"), the only spread there is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from collect import Cell, Record, stat

PREFIX = "harness/"


def stderr_name(metric: str) -> str:
    """ "harness/<task>/acc" -> "harness/<task>/acc_stderr"; a filtered metric keeps its filter last
    ("harness/<task>/exact_match/strict" -> "harness/<task>/exact_match_stderr/strict"), as pl_dpo.harness names them."""
    parts = metric.split("/")
    parts[2] += "_stderr"
    return "/".join(parts)


def harness_metrics(records: Sequence[Record]) -> list[str]:
    return sorted({k for r in records for k in r.metrics if k.startswith(PREFIX) and "_stderr" not in k})


def cell_text(records: Sequence[Record], cell: Cell, t: int, metric: str) -> str:
    found = [r for r in records if r.cell == cell and r.round == t and metric in r.metrics]
    if len(found) == 1 and stderr_name(metric) in found[0].metrics:
        return f"{found[0].metrics[metric]:.3f} ± {found[0].metrics[stderr_name(metric)]:.3f} se"
    return stat(r.metrics[metric] for r in found).fmt()


def harness_section(
    records: Sequence[Record], arms: Sequence[Cell], rounds: Callable[[Cell], list[int]], label: Callable[[Cell], str]
) -> str:
    metrics = harness_metrics(records)
    if not metrics or not arms:
        return ""
    header = ["policy"] + [m[len(PREFIX) :] for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    start = arms[0]  # round 0, πθ(0), is every arm's start: one row
    lines.append("| SFT start (round 0) | " + " | ".join(cell_text(records, start, 0, m) for m in metrics) + " |")
    for cell in arms:
        for t in (t for t in rounds(cell) if t > 0):
            values = " | ".join(cell_text(records, cell, t, m) for m in metrics)
            lines.append(f"| {label(cell)} round {t} | {values} |")
    return (
        "## Benchmark scores (lm-evaluation-harness, config.eval.harness)\n\n"
        "Scored in the run on πθ(0) and every round's policy. With one seed a cell is the score ± lm-eval's "
        "standard error (se); with more, mean ± std over seeds.\n\n" + "\n".join(lines) + "\n"
    )
