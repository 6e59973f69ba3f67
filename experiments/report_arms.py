"""The report's arms: their labels, table order and T-free series, and the markdown table every section writes.

Shared by `report.py` and its section and plot modules; `Report` fills `LABEL_ASSISTANTS` from the sweep.
"""

from __future__ import annotations

import dataclasses

from collect import Cell

from pl_dpo.selfplay import modes

# The control arm first, then the modes in the order of their table.
ARM_ORDER = {"sft": 0, **{name: i + 1 for i, name in enumerate(m for m in modes.MODES if m != "sft")}}
METRICS = ("exact_match", "answer_logp_per_token", "win_rate_vs_sft", "reward_accuracy")


LABEL_ASSISTANTS: set[str] = set()  # modes run with more than one set of assistants (Report fills it)


def arm_label(cell: Cell) -> str:
    if cell.mode == "sft":
        return "SFT control (more epochs)"
    settings = [f"K={cell.K}"]
    if cell.mode in LABEL_ASSISTANTS:
        settings.append(cell.assistants)
    if cell.variant != "pl":
        settings.append(cell.variant)
    if cell.mix_previous:
        settings.append(f"mix {cell.mix_previous} previous")
    if cell.sft_weight:
        settings.append(f"SFT anchor {cell.sft_weight:g}")
    if cell.answer_on_top:
        settings.append("answer on top")
    if cell.prompts_per_round:
        settings.append(f"{cell.prompts_per_round} prompts/round")
    return f"{cell.mode} ({'; '.join(settings)})"


def mode_of(cell: Cell) -> modes.Mode:
    return modes.get(cell.mode)


def arm_key(cell: Cell) -> tuple:
    """Table order: the control, then modes in their table's order, plain arms before their variants."""
    return (
        ARM_ORDER.get(cell.mode, 9),
        cell.K,
        cell.variant != "pl",
        cell.mix_previous,
        cell.sft_weight,
        cell.answer_on_top,
        cell.prompts_per_round,
        cell.T or 0,
        cell.num_train,
        cell.sft_steps,
        cell.assistants,  # last: arms that differ only in their assistants would otherwise follow set order
    )


def without_T(cell: Cell) -> Cell:
    """The arm of a cell, whatever its temperature (the T sweep's series)."""
    return dataclasses.replace(cell, T=None)


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
