"""The report's further sections: the SFT start's length and early stop, compute per round, more than two ranks
(K), method switches, training diagnostics and the appendix of every cell.

Each is a function of a `Report` that returns its markdown, or "" when the sweep does not vary what it needs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from collect import Cell
from report_arms import ARM_ORDER, METRICS, arm_label, md_table, mode_of
from report_plots import plot_vs_round

from pl_dpo.selfplay import modes

if TYPE_CHECKING:
    from report import Report


def sft_length_section(rep: Report) -> str:
    lengths = sorted({c.sft_steps for c in rep.all_cells})
    if len(lengths) < 2:
        return ""
    arms = [c for c in rep.all_cells if c.num_train == rep.ref_n and c.T in (None, rep.ref_T)]
    modes = [m for m in ARM_ORDER if all(any(c.mode == m and c.sft_steps == n for c in arms) for n in lengths)]
    cells = [c for c in arms if c.mode in modes]
    rounds = sorted({t for c in cells for t in rep.rounds(c)})
    out = [f"## Length of the SFT start (T={rep.ref_T:g}, {rep.ref_n} training prompts)\n"]
    for metric in ("exact_match", "answer_logp_per_token"):
        rows = [
            [f"{n}", arm_label(c)] + [rep.fmt(metric, c, t) for t in rounds]
            for n in lengths
            for c in cells
            if c.sft_steps == n
        ]
        out.append(f"**{metric}**\n\n" + md_table(["SFT steps", "arm"] + [f"round {t}" for t in rounds], rows) + "\n")
        if "sft" in modes and len(modes) > 1:
            diffs = []
            for n in lengths:
                control = next(c for c in cells if c.sft_steps == n and c.mode == "sft")
                diffs += [
                    [f"{n}", f"{arm_label(c)} − SFT control"]
                    + [rep.paired(metric, c, t, control, t).fmt() for t in rounds[1:]]
                    for c in cells
                    if c.sft_steps == n and c.mode != "sft"
                ]
            out.append(
                f"**{metric}: paired differences**\n\n"
                + md_table(["SFT steps", "difference"] + [f"round {t}" for t in rounds[1:]], diffs)
                + "\n"
            )
    for n in lengths:
        out.append(
            plot_vs_round(
                rep, [c for c in cells if c.sft_steps == n], f"sft{n}_vs_round.png", f"SFT start of {n} steps"
            )
        )
    return "\n".join(out)


def sft_start_section(rep: Report) -> str:
    """Where early stopping ended πθ(0), per seed (only when the SFT ran with early stopping)."""
    runs = {}
    for r in rep.records:
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
        f"## The SFT start πθ(0) (at most {rep.ref_sft} steps, early stopping)\n\n"
        "Early stopping on the held-out answers' log-likelihood per token: the steps SFT ran, the step "
        "of its best reading (the policy kept is the one of the stopping step), and πθ(0)'s held-out "
        "metrics, per seed.\n\n"
        + md_table(["seed", "SFT steps run", "best step", "exact_match", "answer_logp_per_token"], rows)
        + "\n"
    )


def compute_section(rep: Report) -> str:
    """What each arm spends per round: gradient steps (measured), sequences per step and generation."""
    arms = rep.ref_arms()
    if not any(rep.agg["train_steps"].get((c, t)) for c in arms for t in rep.rounds(c)):
        return ""
    lists_per_step = rep.batch_size
    rows = []
    for c in arms:
        mode = modes.get(c.mode)
        steps = [rep.agg["train_steps"][(c, t)] for t in rep.rounds(c) if (c, t) in rep.agg["train_steps"]]
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
        + md_table(
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


def K_section(rep: Report) -> str:
    """Does ranking more than two responses help? Arms of one family at several K, paired with its K=2."""
    arms = rep.ref_arms()
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
    return "\n".join(out + difference_tables(rep, comparisons))


def difference_tables(rep: Report, pairs: list[tuple[Cell, Cell]]) -> list[str]:
    """Per metric, a table of `arm − base` paired by seed at every round both have run."""
    rounds = sorted({t for c, _ in pairs for t in rep.rounds(c)} - {0})
    out = []
    for metric in ("exact_match", "answer_logp_per_token"):
        rows = [
            [f"{arm_label(c)} − {arm_label(b)}"] + [rep.paired(metric, c, t, b, t).fmt() for t in rounds]
            for c, b in pairs
        ]
        out.append(f"**{metric}**\n\n" + md_table(["difference"] + [f"round {t}" for t in rounds], rows) + "\n")
    return out


def switches_section(rep: Report) -> str:
    """Each method switch against the same arm without it (round mixing, the SFT anchor, another loss)."""
    arms = rep.ref_arms()
    plain = lambda c: dataclasses.replace(c, variant="pl", sft_weight=0.0, mix_previous=0, answer_on_top=False)
    pairs = [(c, plain(c)) for c in arms if c != plain(c) and plain(c) in arms]
    if not pairs:
        return ""
    return "\n".join(["## Method switches against the same arm without them\n", *difference_tables(rep, pairs)])


def diagnostics_section(rep: Report) -> str:
    cells = [c for c in rep.all_cells if c.mode != "sft" and c.num_train == rep.ref_n]
    has = lambda c, t: (c, t) in rep.agg["own_sample_correct"] or (c, t) in rep.agg["top_sample_correct"]
    if not any(has(c, t) for c in cells for t in rep.rounds(c)):
        return ""
    rounds = sorted({t for c in cells for t in rep.rounds(c)} - {0})
    rows = []
    for c in cells:
        for t in rounds:
            if not has(c, t):
                continue
            ranks = [rep.fmt(f"rank{k}_correct", c, t) for k in (1, 2) if k < c.K - 1 and not mode_of(c).needs_verifier]
            verifier = (
                f"{rep.fmt('top_sample_correct', c, t)} / {rep.fmt('tied_lists', c, t)}"
                if (c, t) in rep.agg["top_sample_correct"]
                else "-"
            )
            rows.append(
                [
                    arm_label(c),
                    f"{c.T:g}",
                    str(c.sft_steps),
                    f"{t - 1}→{t}",
                    rep.fmt("own_sample_correct", c, t),
                    ", ".join(ranks) or "-",
                    verifier,
                    rep.fmt("train_pairwise_accuracy", c, t),
                ]
            )
    return (
        "## Training diagnostics\n\nPer round, on the training prompts: the fraction whose own sample "
        "(the lowest-ranked response) already equals the answer; the same for the middle ranks (assistant "
        "or πθ(0) samples); for verifier-ranked lists, the fraction whose best sample is correct and the "
        "fraction whose samples all tie (nothing to learn from that list); the implicit reward's pairwise "
        "ranking accuracy over the round's last quarter of steps.\n\n"
        + md_table(
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


def appendix(rep: Report) -> str:
    rows = []
    for c in rep.all_cells:
        for t in rep.rounds(c):
            s = rep.cell_stat("exact_match", c, t)
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
                + [rep.fmt(m, c, t) for m in METRICS]
            )
    return (
        "## Appendix: every cell\n\n"
        + md_table(["mode", "K", "T", "train", "SFT steps", "round", "seeds", *METRICS], rows)
        + "\n"
    )
