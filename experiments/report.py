"""Turn a sweep's runs into a markdown report with tables (mean ± std over seeds) and PNG plots.

    .venv/bin/python experiments/report.py --sweep_dir=runs/study --out=experiments/RESULTS.md

The reference setting is the temperature shared by the most arms (`--ref_T`) on the
largest training set; the sections are written when the sweep varies what they need:
arms vs round (rounds vs SFT epochs, K), T, training-set size, training diagnostics,
and an appendix with every cell. Text between `<!-- findings:begin -->` and
`<!-- findings:end -->` in an existing `--out` file is kept, so hand-written findings
survive regeneration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collect import Cell, Record, aggregate, read_sweep, stat  # noqa: E402
from report_harness import harness_section  # noqa: E402

from pl_dpo.selfplay import modes  # noqa: E402
from pl_dpo.workdir import layout as wd  # noqa: E402

# The control arm first, then the modes in the order of their table.
ARM_ORDER = {"sft": 0, **{name: i + 1 for i, name in enumerate(m for m in modes.MODES if m != "sft")}}
METRICS = ("exact_match", "answer_logp_per_token", "win_rate_vs_sft", "reward_accuracy")
FINDINGS = ("<!-- findings:begin -->", "<!-- findings:end -->")


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
    )


def without_T(cell: Cell) -> Cell:
    """The arm of a cell, whatever its temperature (the T sweep's series)."""
    return dataclasses.replace(cell, T=None)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    def __init__(self, records: list[Record], plots_dir: str, plots_rel: str, ref_T: float | None = None):
        self.records, self.plots_dir, self.plots_rel = records, plots_dir, plots_rel
        self.all_cells = sorted({r.cell for r in records}, key=arm_key)
        LABEL_ASSISTANTS.clear()
        LABEL_ASSISTANTS.update(
            m
            for m in {c.mode for c in self.all_cells}
            if len({c.assistants for c in self.all_cells if c.mode == m}) > 1
        )
        # The reference SFT length is the most common one; other lengths get their own section.
        self.ref_sft = Counter(c.sft_steps for c in self.all_cells).most_common(1)[0][0]
        self.cells = [c for c in self.all_cells if c.sft_steps == self.ref_sft]
        self.ref_n = max(c.num_train for c in self.cells)
        arms_per_T = Counter(c.T for c in self.cells if c.T is not None and c.num_train == self.ref_n)
        self.ref_T = ref_T if ref_T is not None else max(arms_per_T, key=lambda t: (arms_per_T[t], t))
        diag = (
            "own_sample_correct",
            "train_pairwise_accuracy",
            "rank1_correct",
            "rank2_correct",
            "top_sample_correct",
            "tied_lists",
            "train_steps",
        )
        self.agg = {m: aggregate(records, m) for m in (*METRICS, *diag)}
        self.plots: list[str] = []
        # Lists per training step (one value per sweep: the studies keep it fixed across arms).
        self.batch_size = int(wd.read_config_json(os.path.join(records[0].job, "config.json"))["rounds"]["batch_size"])

    def rounds(self, cell: Cell) -> list[int]:
        return sorted({r.round for r in self.records if r.cell == cell})

    def paired(self, metric: str, cell: Cell, t: int, base: Cell, base_t: int):
        """Mean ± std over seeds of metric(cell, t) - metric(base, base_t), seed by seed."""

        def per_seed(c, r):
            return {
                x.seed: x.metrics[metric] for x in self.records if x.cell == c and x.round == r and metric in x.metrics
            }

        a, b = per_seed(cell, t), per_seed(base, base_t)
        return stat(a[s] - b[s] for s in sorted(set(a) & set(b)))

    def cell_stat(self, metric: str, cell: Cell, t: int):
        return self.agg[metric].get((cell, t))

    def fmt(self, metric: str, cell: Cell, t: int) -> str:
        s = self.cell_stat(metric, cell, t)
        return s.fmt() if s else "-"

    def ref_arms(self) -> list[Cell]:
        return [c for c in self.cells if c.num_train == self.ref_n and c.T in (None, self.ref_T)]

    # ------------------------------------------------------------------ sections

    def arms_section(self) -> str:
        arms = self.ref_arms()
        rounds = sorted({t for c in arms for t in self.rounds(c)})
        out = [
            f"## Arms vs round (T={self.ref_T:g}, {self.ref_n} training prompts, {self.ref_sft} SFT steps)\n",
            "Round 0 is πθ(0), the SFT start shared by every arm of a seed. The SFT control spends the "
            "same number of gradient steps per round on more SFT epochs on the dataset answers.\n",
        ]
        for metric in METRICS:
            rows = [[arm_label(c)] + [self.fmt(metric, c, t) for t in rounds] for c in arms]
            out.append(f"**{metric}**\n\n" + _table(["arm"] + [f"round {t}" for t in rounds], rows) + "\n")
        control = next((c for c in arms if c.mode == "sft"), None)
        for metric in ("exact_match", "answer_logp_per_token"):
            rows = [
                [f"{arm_label(c)} − SFT start"] + [self.paired(metric, c, t, c, 0).fmt() for t in rounds[1:]]
                for c in arms
            ]
            if control is not None:
                rows += [
                    [f"{arm_label(c)} − SFT control"]
                    + [self.paired(metric, c, t, control, t).fmt() for t in rounds[1:]]
                    for c in arms
                    if c != control
                ]
            out.append(
                f"**{metric}: paired differences (per seed, then mean ± std)**\n\n"
                + _table(["difference"] + [f"round {t}" for t in rounds[1:]], rows)
                + "\n"
            )
        tasks = sorted({k for r in self.records for k in r.metrics if k.startswith("exact_match/")})
        if tasks:
            per_task = {k: aggregate(self.records, k) for k in tasks}
            cell_fmt = lambda k, c, t: per_task[k][(c, t)].fmt() if (c, t) in per_task[k] else "-"
            rows = [["SFT start (round 0)"] + [cell_fmt(k, arms[0], 0) for k in tasks]]
            for c in arms:
                last = self.rounds(c)[-1]
                rows.append([f"{arm_label(c)} round {last}"] + [cell_fmt(k, c, last) for k in tasks])
            out.append("**exact match per task (last round)**\n\n" + _table(["policy"] + tasks, rows) + "\n")
        out.append(self.plot_vs_round(arms, "arms_vs_round.png", "arms vs round"))
        if control is not None and len(arms) > 2:
            out.append(self.plot_paired(arms, control))
        return "\n".join(out)

    def T_section(self) -> str:
        groups: dict[Cell, list[Cell]] = {}
        for c in self.cells:
            if c.T is not None and c.num_train == self.ref_n:
                groups.setdefault(without_T(c), []).append(c)
        # One series per arm swept over at least two temperatures.
        by_arm = {
            arm_label(arm): sorted(v, key=lambda c: c.T)
            for arm, v in sorted(groups.items(), key=lambda kv: arm_key(kv[0]))
            if len({c.T for c in v}) >= 2
        }
        if not by_arm:
            return ""
        out = [f"## Temperature T ({self.ref_n} training prompts)\n"]
        for metric in ("exact_match", "answer_logp_per_token", "reward_accuracy"):
            header, rows = ["T"], {}
            for label, cells in by_arm.items():
                common = sorted(set.intersection(*(set(self.rounds(c)) for c in cells)) - {0})
                header += [f"{label} round {t}" for t in common]
                for c in cells:
                    rows.setdefault(c.T, {}).update({f"{label} round {t}": self.fmt(metric, c, t) for t in common})
            table = [[f"{T:g}"] + [rows[T].get(h, "-") for h in header[1:]] for T in sorted(rows)]
            out.append(f"**{metric}**\n\n" + _table(header, table) + "\n")
        for label, cells in by_arm.items():
            out.append(self.plot_vs_round(cells, f"T_vs_round_{_slug(label)}.png", f"{label}: by T", by_T=True))
        out.append(self.plot_vs_T(by_arm))
        return "\n".join(out)

    def size_section(self) -> str:
        sizes = sorted({c.num_train for c in self.cells})
        if len(sizes) < 2:
            return ""
        arms = [c for c in self.cells if c.T in (None, self.ref_T)]
        modes = sorted(
            {c.mode for c in arms if len({a.num_train for a in arms if a.mode == c.mode}) == len(sizes)},
            key=lambda m: ARM_ORDER.get(m, 9),
        )
        out = [f"## Training-set size (T={self.ref_T:g})\n"]
        for metric in ("exact_match", "answer_logp_per_token"):
            header, rows = ["training prompts", "SFT start"], []
            common = None
            for m in modes:
                rs = set.intersection(*(set(self.rounds(c)) for c in arms if c.mode == m)) - {0}
                common = rs if common is None else common & rs
            common = sorted(common or [])
            for m in modes:
                header += [f"{m} round {t}" for t in common]
            for n in sizes:
                row = [str(n)]
                first = next(c for c in arms if c.num_train == n and c.mode == modes[0])
                row.append(self.fmt(metric, first, 0))
                for m in modes:
                    c = next(c for c in arms if c.num_train == n and c.mode == m)
                    row += [self.fmt(metric, c, t) for t in common]
                rows.append(row)
            out.append(f"**{metric}**\n\n" + _table(header, rows) + "\n")
            if "sft" in modes and len(modes) > 1:
                diff_rows = []
                for n in sizes:
                    control = next(c for c in arms if c.num_train == n and c.mode == "sft")
                    for m in modes:
                        if m != "sft":
                            c = next(c for c in arms if c.num_train == n and c.mode == m)
                            diff_rows.append(
                                [str(n), f"{m} − SFT control"]
                                + [self.paired(metric, c, t, control, t).fmt() for t in common]
                            )
                out.append(
                    f"**{metric}: paired differences**\n\n"
                    + _table(["training prompts", "difference"] + [f"round {t}" for t in common], diff_rows)
                    + "\n"
                )
        out.append(self.plot_size(arms, modes, sizes))
        return "\n".join(out)

    def sft_length_section(self) -> str:
        lengths = sorted({c.sft_steps for c in self.all_cells})
        if len(lengths) < 2:
            return ""
        arms = [c for c in self.all_cells if c.num_train == self.ref_n and c.T in (None, self.ref_T)]
        modes = [m for m in ARM_ORDER if all(any(c.mode == m and c.sft_steps == n for c in arms) for n in lengths)]
        cells = [c for c in arms if c.mode in modes]
        rounds = sorted({t for c in cells for t in self.rounds(c)})
        out = [f"## Length of the SFT start (T={self.ref_T:g}, {self.ref_n} training prompts)\n"]
        for metric in ("exact_match", "answer_logp_per_token"):
            rows = [
                [f"{n}", arm_label(c)] + [self.fmt(metric, c, t) for t in rounds]
                for n in lengths
                for c in cells
                if c.sft_steps == n
            ]
            out.append(f"**{metric}**\n\n" + _table(["SFT steps", "arm"] + [f"round {t}" for t in rounds], rows) + "\n")
            if "sft" in modes and len(modes) > 1:
                diffs = []
                for n in lengths:
                    control = next(c for c in cells if c.sft_steps == n and c.mode == "sft")
                    diffs += [
                        [f"{n}", f"{arm_label(c)} − SFT control"]
                        + [self.paired(metric, c, t, control, t).fmt() for t in rounds[1:]]
                        for c in cells
                        if c.sft_steps == n and c.mode != "sft"
                    ]
                out.append(
                    f"**{metric}: paired differences**\n\n"
                    + _table(["SFT steps", "difference"] + [f"round {t}" for t in rounds[1:]], diffs)
                    + "\n"
                )
        for n in lengths:
            out.append(
                self.plot_vs_round(
                    [c for c in cells if c.sft_steps == n], f"sft{n}_vs_round.png", f"SFT start of {n} steps"
                )
            )
        return "\n".join(out)

    def sft_start_section(self) -> str:
        """Where early stopping ended πθ(0), per seed (only when the SFT ran with early stopping)."""
        runs = {}
        for r in self.records:
            if r.round == 0 and "sft_steps_run" in r.metrics:
                runs[r.seed] = r
        if not runs:
            return ""
        rows = [
            [
                str(seed),
                f"{r.metrics['sft_steps_run']:.0f}",
                f"{r.metrics['sft_best_step']:.0f}",
                f"{r.metrics.get('exact_match', float('nan')):.3f}",
                f"{r.metrics.get('answer_logp_per_token', float('nan')):.3f}",
            ]
            for seed, r in sorted(runs.items())
        ]
        return (
            f"## The SFT start πθ(0) (at most {self.ref_sft} steps, early stopping)\n\n"
            "Early stopping on the held-out answers' log-likelihood per token: the steps SFT ran, the step "
            "of its best reading (the policy kept is the one of the stopping step), and πθ(0)'s held-out "
            "metrics, per seed.\n\n"
            + _table(["seed", "SFT steps run", "best step", "exact_match", "answer_logp_per_token"], rows)
            + "\n"
        )

    def compute_section(self) -> str:
        """What each arm spends per round: gradient steps (measured), sequences per step and generation."""
        arms = self.ref_arms()
        if not any(self.agg["train_steps"].get((c, t)) for c in arms for t in self.rounds(c)):
            return ""
        lists_per_step = self.batch_size
        rows = []
        for c in arms:
            mode = modes.get(c.mode)
            steps = [self.agg["train_steps"][(c, t)] for t in self.rounds(c) if (c, t) in self.agg["train_steps"]]
            rows.append(
                [
                    arm_label(c),
                    ", ".join(f"{s.mean:.0f}" for s in steps) or "-",
                    str(lists_per_step * c.K),
                    str(mode.policy_samples_per_prompt(c.K, c.answer_on_top)),
                    str(mode.policy_samples_per_prompt(c.K, c.answer_on_top) * (c.prompts_per_round or c.num_train)),
                    str(mode.cached_samples_per_prompt(c.K)),
                ]
            )
        return (
            "## Compute per round\n\n"
            "Gradient steps per round (measured from metrics.jsonl, rounds 1..), sequences per step (lists of "
            f"{lists_per_step} x K responses; the control arm's are dataset answers), and generation: samples of "
            "πθ(t) per ranked prompt and per round in all (an arm with `rounds.prompts_per_round` ranks that many "
            "prompts a round), and samples per training prompt generated once (assistant's, πθ(0)'s) and reused "
            "by every round.\n\n"
            + _table(
                [
                    "arm",
                    "steps per round",
                    "sequences per step",
                    "πθ(t) samples / prompt",
                    "πθ(t) samples / round",
                    "cached / prompt",
                ],
                rows,
            )
            + "\n"
        )

    def K_section(self) -> str:
        """Does ranking more than two responses help? Arms of one family at several K, paired with its K=2."""
        arms = self.ref_arms()
        families: dict[Cell, list[Cell]] = {}  # arms that differ in K only
        for c in arms:
            if c.mode != "sft":
                families.setdefault(dataclasses.replace(c, K=0), []).append(c)
        comparisons = []
        for cells in families.values():
            base = next((c for c in cells if c.K == 2), None)
            comparisons += [(c, base) for c in cells if base is not None and c.K > 2]
        spin = next(
            (c for c in arms if c.mode == "spin" and c == dataclasses.replace(c, mix_previous=0, sft_weight=0.0)), None
        )
        if spin is not None:  # the K=3 self-play arms against SPIN (same lists plus a middle rank)
            comparisons += [(c, spin) for c in arms if c.mode in ("asft", "triplet", "ladder")]
            # Verifier-ranked lists on a subset of prompts sized to SPIN's generation (K samples of N/K prompts).
            comparisons += [(c, spin) for c in arms if c.prompts_per_round and mode_of(c).needs_verifier]
        if not comparisons:
            return ""
        out = [
            "## More than two ranks at the same number of steps\n\n"
            "Per seed, the arm minus its K=2 counterpart (verifier-ranked lists: K samples against two; "
            "self-play triplets and aSFT: against SPIN, whose lists they extend by a middle rank; verifier-ranked lists "
            "on N/K prompts a round: against SPIN, which generates as many samples), then mean ± std over seeds.\n"
        ]
        return "\n".join(out + self.difference_tables(comparisons))

    def difference_tables(self, pairs: list[tuple[Cell, Cell]]) -> list[str]:
        """Per metric, a table of `arm − base` paired by seed at every round both have run."""
        rounds = sorted({t for c, _ in pairs for t in self.rounds(c)} - {0})
        out = []
        for metric in ("exact_match", "answer_logp_per_token"):
            rows = [
                [f"{arm_label(c)} − {arm_label(b)}"] + [self.paired(metric, c, t, b, t).fmt() for t in rounds]
                for c, b in pairs
            ]
            out.append(f"**{metric}**\n\n" + _table(["difference"] + [f"round {t}" for t in rounds], rows) + "\n")
        return out

    def switches_section(self) -> str:
        """Each method switch against the same arm without it (round mixing, the SFT anchor, another loss)."""
        arms = self.ref_arms()
        plain = lambda c: dataclasses.replace(c, variant="pl", sft_weight=0.0, mix_previous=0, answer_on_top=False)
        pairs = [(c, plain(c)) for c in arms if c != plain(c) and plain(c) in arms]
        if not pairs:
            return ""
        return "\n".join(["## Method switches against the same arm without them\n", *self.difference_tables(pairs)])

    def diagnostics_section(self) -> str:
        cells = [c for c in self.all_cells if c.mode != "sft" and c.num_train == self.ref_n]
        has = lambda c, t: (c, t) in self.agg["own_sample_correct"] or (c, t) in self.agg["top_sample_correct"]
        if not any(has(c, t) for c in cells for t in self.rounds(c)):
            return ""
        rounds = sorted({t for c in cells for t in self.rounds(c)} - {0})
        rows = []
        for c in cells:
            for t in rounds:
                if not has(c, t):
                    continue
                ranks = [
                    self.fmt(f"rank{k}_correct", c, t) for k in (1, 2) if k < c.K - 1 and not mode_of(c).needs_verifier
                ]
                verifier = (
                    f"{self.fmt('top_sample_correct', c, t)} / {self.fmt('tied_lists', c, t)}"
                    if (c, t) in self.agg["top_sample_correct"]
                    else "-"
                )
                rows.append(
                    [
                        arm_label(c),
                        f"{c.T:g}",
                        str(c.sft_steps),
                        f"{t - 1}→{t}",
                        self.fmt("own_sample_correct", c, t),
                        ", ".join(ranks) or "-",
                        verifier,
                        self.fmt("train_pairwise_accuracy", c, t),
                    ]
                )
        return (
            "## Training diagnostics\n\nPer round, on the training prompts: the fraction whose own sample "
            "(the lowest-ranked response) already equals the answer; the same for the middle ranks (assistant "
            "or πθ(0) samples); for verifier-ranked lists, the fraction whose best sample is correct and the "
            "fraction whose samples all tie (nothing to learn from that list); the implicit reward's pairwise "
            "ranking accuracy over the round's last quarter of steps.\n\n"
            + _table(
                [
                    "arm",
                    "T",
                    "SFT steps",
                    "round",
                    "own sample = answer",
                    "middle ranks = answer",
                    "best sample correct / all tied",
                    "train pairwise acc.",
                ],
                rows,
            )
            + "\n"
        )

    def appendix(self) -> str:
        rows = []
        for c in self.all_cells:
            for t in self.rounds(c):
                s = self.cell_stat("exact_match", c, t)
                rows.append(
                    [
                        c.mode + (f" ({c.assistants})" if c.assistants else ""),
                        str(c.K),
                        "-" if c.T is None else f"{c.T:g}",
                        str(c.num_train),
                        str(c.sft_steps),
                        str(t),
                        str(s.n if s else 0),
                    ]
                    + [self.fmt(m, c, t) for m in METRICS]
                )
        return (
            "## Appendix: every cell\n\n"
            + _table(["mode", "K", "T", "train", "SFT steps", "round", "seeds", *METRICS], rows)
            + "\n"
        )

    # ------------------------------------------------------------------ plots

    def _save(self, fig, name: str, title: str) -> str:
        os.makedirs(self.plots_dir, exist_ok=True)
        fig.tight_layout()
        fig.savefig(os.path.join(self.plots_dir, name), dpi=110)
        plt.close(fig)
        self.plots.append(name)
        return f"![{title}]({self.plots_rel}/{name})\n"

    def _series(self, metric: str, cell: Cell):
        pts = [(t, self.cell_stat(metric, cell, t)) for t in self.rounds(cell)]
        pts = [(t, s) for t, s in pts if s and s.n]
        return [t for t, _ in pts], [s.mean for _, s in pts], [s.std for _, s in pts]

    def plot_vs_round(self, cells: list[Cell], name: str, title: str, by_T: bool = False) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
            for c in cells:
                x, y, e = self._series(metric, c)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"T={c.T:g}" if by_T else arm_label(c))
            ax.set_xlabel("round (0 = SFT start)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title} (mean ± std over seeds)")
        return self._save(fig, name, title)

    def plot_paired(self, arms: list[Cell], control: Cell) -> str:
        """Each arm minus the control at the last round both have, per seed: mean ± std as horizontal bars."""
        others = [c for c in arms if c != control]
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(others) + 1.6), sharey=True)
        for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
            stats, labels = [], []
            for c in others:
                last = max(set(self.rounds(c)) & set(self.rounds(control)))
                stats.append(self.paired(metric, c, last, control, last))
                labels.append(f"{arm_label(c)}, round {last}")
            y = range(len(others))
            ax.barh(y, [s.mean for s in stats], xerr=[s.std for s in stats], capsize=3, color="tab:blue", alpha=0.7)
            ax.axvline(0, color="gray", lw=1)
            ax.set_yticks(list(y), labels, fontsize=8)
            ax.set_xlabel(f"{metric}: arm − SFT control")
            ax.grid(alpha=0.3, axis="x")
        axes[0].invert_yaxis()  # the table's order, top down (the y axis is shared: invert it once)
        fig.suptitle("paired by seed: each arm minus continued SFT at the same round (mean ± std over seeds)")
        return self._save(fig, "paired_vs_control.png", "each arm minus continued SFT")

    def plot_vs_T(self, by_arm: dict[str, list[Cell]]) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
            for label, cells in by_arm.items():
                last = max(set.intersection(*(set(self.rounds(c)) for c in cells)))
                stats = [self.cell_stat(metric, c, last) for c in cells]
                ax.errorbar(
                    [c.T for c in cells],
                    [s.mean for s in stats],
                    yerr=[s.std for s in stats],
                    marker="o",
                    capsize=3,
                    label=f"{label}, round {last}",
                )
            start = self.cell_stat(metric, next(iter(by_arm.values()))[0], 0)
            if start:
                ax.axhline(start.mean, color="gray", ls="--", label="SFT start")
            ax.set_xscale("log")
            ax.set_xlabel("T")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("metric vs T per arm (mean ± std over seeds)")
        return self._save(fig, "vs_T.png", "metric vs T")

    def plot_size(self, arms: list[Cell], modes: list[str], sizes: list[int]) -> str:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric in zip(axes, ("exact_match", "answer_logp_per_token")):
            first = [next(c for c in arms if c.num_train == n and c.mode == modes[0]) for n in sizes]
            s0 = [self.cell_stat(metric, c, 0) for c in first]
            ax.errorbar(
                sizes,
                [s.mean for s in s0],
                yerr=[s.std for s in s0],
                marker="o",
                capsize=3,
                color="gray",
                ls="--",
                label="SFT start",
            )
            for m in modes:
                cells = [next(c for c in arms if c.num_train == n and c.mode == m) for n in sizes]
                last = max(set.intersection(*(set(self.rounds(c)) for c in cells)))
                st = [self.cell_stat(metric, c, last) for c in cells]
                ax.errorbar(
                    sizes,
                    [s.mean for s in st],
                    yerr=[s.std for s in st],
                    marker="o",
                    capsize=3,
                    label=f"{arm_label(cells[0])} round {last}",
                )
            ax.set_xscale("log")
            ax.set_xlabel("training prompts")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("training-set size (mean ± std over seeds)")
        return self._save(fig, "train_size.png", "training-set size")


def _wall_time(sweep_dir: str) -> str:
    path = os.path.join(sweep_dir, "sweep_log.jsonl")
    if not os.path.exists(path):
        return "no sweep_log.jsonl"
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in recs if r["rc"] == 0]
    span = max(r["end"] for r in recs) - min(r["end"] - r["seconds"] for r in recs) if recs else 0
    return (
        f"{len(ok)} job runs finished, {sum(r['seconds'] for r in ok) / 60:.1f} min of job time "
        f"({sum(r['seconds'] for r in recs) / 60:.1f} min including failed/interrupted runs), "
        f"{span / 60:.1f} min from first start to last end"
    )


def build(
    sweep_dir: str, out: str, plots_dir: str | None = None, ref_T: float | None = None, command: str | None = None
) -> str:
    records = read_sweep(sweep_dir)
    if not records:
        raise SystemExit(f"report: no evaluated job under {sweep_dir} (each job needs config.json and sft/eval_0.json)")
    out_dir = os.path.dirname(os.path.abspath(out))
    plots_dir = plots_dir or os.path.join(out_dir, "plots")
    rep = Report(records, plots_dir, os.path.relpath(plots_dir, out_dir), ref_T)
    jobs = sorted({r.job for r in records})
    seeds = sorted({r.seed for r in records})
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = "?"
    findings = f"{FINDINGS[0]}\n(no findings written yet)\n{FINDINGS[1]}"
    if os.path.exists(out):
        old = open(out, encoding="utf-8").read()
        if FINDINGS[0] in old and FINDINGS[1] in old:
            findings = old[old.index(FINDINGS[0]) : old.index(FINDINGS[1]) + len(FINDINGS[1])]
    parts = [
        "# Results\n",
        f"Generated by `{command or 'experiments/report.py'}` from {len(jobs)} jobs in `{sweep_dir}` "
        f"(seeds {seeds}; code at commit {commit}). Wall time: {_wall_time(sweep_dir)}. "
        "Cells: mean ± sample std over seeds; (n=…) marks cells with fewer than 3 seeds.\n",
        findings + "\n",
        rep.sft_start_section(),
        rep.arms_section(),
        harness_section(rep.records, rep.ref_arms(), rep.rounds, arm_label),
        rep.compute_section(),
        rep.K_section(),
        rep.switches_section(),
        rep.T_section(),
        rep.size_section(),
        rep.sft_length_section(),
        rep.diagnostics_section(),
        rep.appendix(),
    ]
    text = "\n".join(p for p in parts if p)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"report: {out} ({len(records)} records, {len(jobs)} jobs); plots in {plots_dir}: {', '.join(rep.plots)}")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep_dir", required=True, help="parent folder of the job workdirs")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--plots_dir", default=None, help="PNG folder (default: plots/ next to --out)")
    p.add_argument("--ref_T", type=float, default=None, help="temperature of the reference arms")
    args = p.parse_args(argv)
    build(
        args.sweep_dir,
        args.out,
        args.plots_dir,
        args.ref_T,
        command="python experiments/report.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )


if __name__ == "__main__":
    main()
