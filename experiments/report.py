"""Turn a sweep's runs into a markdown report with tables (mean ± std over seeds) and PNG plots.

    .venv/bin/python experiments/report.py --sweep_dir=runs/study --out=experiments/RESULTS.md

The reference setting is the temperature shared by the most arms (`--ref_T`) on the
largest training set; the sections are written when the sweep varies what they need:
arms vs round (rounds vs SFT epochs, K), T, training-set size, training diagnostics,
and an appendix with every cell. Text between `<!-- findings:begin -->` and
`<!-- findings:end -->` in an existing `--out` file is kept, so hand-written findings
survive regeneration.

Here: `Report` (the reference setting; the arms, T and size sections), `build` and the command.
Beside it: `report_arms.py` (arm labels and order, the markdown table), `report_sections.py` (the
other sections), `report_plots.py` (the PNGs) and `report_harness.py` (the benchmark section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collect import Cell, Record, aggregate, read_sweep, stat  # noqa: E402
from report_arms import ARM_ORDER, LABEL_ASSISTANTS, METRICS, arm_key, arm_label, md_table, slug, without_T  # noqa: E402
from report_harness import harness_section  # noqa: E402
from report_plots import plot_paired, plot_size, plot_vs_round, plot_vs_T  # noqa: E402
from report_sections import (  # noqa: E402
    K_section,
    appendix,
    compute_section,
    diagnostics_section,
    sft_length_section,
    sft_start_section,
    switches_section,
)

from pl_dpo.workdir import layout as wd  # noqa: E402

FINDINGS = ("<!-- findings:begin -->", "<!-- findings:end -->")


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
            out.append(f"**{metric}**\n\n" + md_table(["arm"] + [f"round {t}" for t in rounds], rows) + "\n")
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
                + md_table(["difference"] + [f"round {t}" for t in rounds[1:]], rows)
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
            out.append("**exact match per task (last round)**\n\n" + md_table(["policy"] + tasks, rows) + "\n")
        out.append(plot_vs_round(self, arms, "arms_vs_round.png", "arms vs round"))
        if control is not None and len(arms) > 2:
            out.append(plot_paired(self, arms, control))
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
            out.append(f"**{metric}**\n\n" + md_table(header, table) + "\n")
        for label, cells in by_arm.items():
            out.append(plot_vs_round(self, cells, f"T_vs_round_{slug(label)}.png", f"{label}: by T", by_T=True))
        out.append(plot_vs_T(self, by_arm))
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
            out.append(f"**{metric}**\n\n" + md_table(header, rows) + "\n")
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
                    + md_table(["training prompts", "difference"] + [f"round {t}" for t in common], diff_rows)
                    + "\n"
                )
        out.append(plot_size(self, arms, modes, sizes))
        return "\n".join(out)


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
        sft_start_section(rep),
        rep.arms_section(),
        harness_section(rep.records, rep.ref_arms(), rep.rounds, arm_label),
        compute_section(rep),
        K_section(rep),
        switches_section(rep),
        rep.T_section(),
        rep.size_section(),
        sft_length_section(rep),
        diagnostics_section(rep),
        appendix(rep),
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
