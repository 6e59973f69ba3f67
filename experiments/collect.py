"""Read a sweep's job workdirs into per-(arm, seed, round) records and aggregate over seeds.

One record per evaluated policy of one arm of one job: the arm (mode), its K, T, the
training-set size, the seed, the round t (0 = πθ(0), the SFT start every arm of a job
shares), the held-out metrics (from `<lineage>/eval_<t>.json`, the same values as the
`eval/<lineage>` records of metrics.jsonl, which a job seeded by experiments/sweep.py
may have received by copy) and training diagnostics of the round that produced it
(from metrics.jsonl and the round's ranked set).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterable

import numpy as np

from pl_dpo.selfplay import modes
from pl_dpo.workdir import layout as wd


@dataclasses.dataclass(frozen=True)
class Cell:
    """What a study varies: the arm and its settings (seeds are aggregated over)."""

    mode: str
    K: int
    T: float | None  # None for the SFT control arm (no temperature)
    num_train: int
    sft_steps: int  # length of the SFT that made πθ(0)
    assistants: str = ""  # the assistants the arm ranks, e.g. "96x3@400>80x2@250" ("" for spin / sft)
    # The method switches of the second study (configs/study2.py); defaults are the plain arm.
    variant: str = "pl"  # config.loss.variant
    sft_weight: float = 0.0  # config.loss.sft_weight (the SFT anchor)
    mix_previous: int = 0  # config.rounds.mix_previous (round mixing)
    answer_on_top: bool = False  # config.rounds.answer_on_top (ranked_samples)
    prompts_per_round: int = 0  # config.rounds.prompts_per_round (0: every training prompt every round)


@dataclasses.dataclass
class Record:
    cell: Cell
    seed: int
    round: int
    metrics: dict[str, float]
    job: str


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _k(mode: str, cfg: dict[str, Any]) -> int:
    return int(modes.get(mode).list_size(len(cfg.get("assistants") or []), int(cfg["loss"]["K"])))


def _assistants(mode: str, cfg: dict[str, Any]) -> str:
    """The assistants a mode ranks (asft: the first; ladder: all), as width x layers @ SFT steps."""
    used = modes.get(mode).assistants_ranked(_k(mode, cfg))
    parts = []
    for a in (cfg.get("assistants") or [])[:used]:
        o = (a.get("model") or {}).get("overrides") or {}
        parts.append(
            a["model"]["hf_path"]
            if a["model"].get("hf_path")
            else f"{o.get('hidden_size', '?')}x{o.get('num_layers', '?')}@{a.get('sft_steps')}"
        )
    return ">".join(parts)


def _train_summary(metrics_path: str) -> dict[tuple[str, int], dict[str, float]]:
    """Per (mode, round index t): mean loss / pairwise accuracy over the round's last quarter of steps."""
    per_phase: dict[str, list[dict[str, Any]]] = {}
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                if "/round_" not in line:
                    continue
                rec = json.loads(line)
                phase = str(rec.get("phase", ""))
                if "/round_" in phase and not phase.startswith(("eval/", "timing/")):
                    per_phase.setdefault(rec["phase"], []).append(rec)
    out = {}
    for phase, recs in per_phase.items():
        mode, _, t = phase.partition("/round_")
        by_step = {r["step"]: r for r in recs}  # a resumed round may log a step twice: keep the last
        steps = sorted(by_step)
        tail = [by_step[s] for s in steps[-max(1, len(steps) // 4) :]]
        summary = {}
        for key in ("loss", "pairwise_accuracy"):
            values = [r[key] for r in tail if isinstance(r.get(key), (int, float))]
            if values:
                summary[f"train_{key}"] = float(np.mean(values))
        summary["train_steps"] = float(steps[-1] + 1)  # the round's gradient steps: every step is logged, from 0
        out[(mode, int(t))] = summary
    return out


def _rank_correct(job: str, cell: Cell, t: int) -> dict[str, float]:
    """Round t's ranked set: the fraction of prompts whose rank-k response equals the answer (rank 0),
    for k = 1..K-1 (assistant samples, then the policy's own sample last). Verifier-ranked lists
    (graded labels, no answer on top): the fraction whose best sample is fully correct (grade 1) and
    the fraction whose K samples all tie (no preference to learn)."""
    path = wd.ranked_set_path(job, cell.mode, t)
    if not os.path.exists(path):
        return {}
    with np.load(path) as z:
        tokens, mask = z["tokens_NxKxL"], z["loss_mask_NxKxL"].astype(bool)
        labels = z["labels_NxK"] if "labels_NxK" in z.files else None
    K = tokens.shape[1]
    if labels is not None and modes.get(cell.mode).needs_verifier and not cell.answer_on_top:
        return {
            "top_sample_correct": float(np.mean(labels[:, 0] >= 1.0)),
            "tied_lists": float(np.mean(np.all(labels == labels[:, :1], axis=1))),
        }
    answers = [row[0][m[0]].tolist() for row, m in zip(tokens, mask)]
    out = {}
    for k in range(1, K):
        same = [row[k][m[k]].tolist() == a for row, m, a in zip(tokens, mask, answers)]
        out[f"rank{k}_correct"] = float(np.mean(same))
    out["own_sample_correct"] = out[f"rank{K - 1}_correct"]
    return out


def _sft_convergence(metrics_path: str) -> dict[str, float]:
    """Where early stopping ended πθ(0)'s SFT: the steps it ran and its best reading's step ({} without
    early stopping, or in a job that received πθ(0) by copy: the donor job has them)."""
    last = None
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                if '"sft/early_stopping"' in line:
                    last = json.loads(line)
    if last is None:
        return {}
    return {"sft_steps_run": float(last["step"]), "sft_best_step": float(last["best_step"])}


def read_job(job: str) -> list[Record]:
    """The records of one job workdir (empty when it has not evaluated anything yet)."""
    cfg_path = os.path.join(job, "config.json")
    start_path = wd.eval_path(job, "sft", 0)
    if not (os.path.exists(cfg_path) and os.path.exists(start_path)):
        return []
    cfg = wd.read_config_json(cfg_path)
    num_train = int(cfg["data"].get("num_train") or cfg["data"].get("options", {}).get("n_train", 0))
    seed = int(cfg["seed"])
    start = dict(_read_json(start_path)["metrics"])
    start.update(_sft_convergence(os.path.join(job, "metrics.jsonl")))
    train = _train_summary(os.path.join(job, "metrics.jsonl"))
    records = []
    for mode in [m.strip() for m in str(cfg["modes"]).split(",") if m.strip()]:
        cell = Cell(
            mode,
            _k(mode, cfg),
            None if modes.get(mode).objective is modes.Objective.SFT else float(cfg["loss"]["T"]),
            num_train,
            int(cfg["sft"]["steps"]),
            _assistants(mode, cfg),
            str(cfg["loss"].get("variant", "pl")),
            float(cfg["loss"].get("sft_weight", 0.0)),
            int(cfg["rounds"].get("mix_previous", 0)),
            bool(cfg["rounds"].get("answer_on_top", False)),
            int(cfg["rounds"].get("prompts_per_round", 0) or 0),
        )
        records.append(Record(cell, seed, 0, dict(start), job))
        # Mode "sft" (the control arm) continues the SFT lineage: its policies are sft/eval_1.. .
        for path in glob.glob(wd.eval_path(job, mode, "*")):
            t = int(os.path.basename(path)[len("eval_") : -len(".json")])
            if t == 0:
                continue
            metrics = dict(_read_json(path)["metrics"])
            metrics.update(train.get((mode, t - 1), {}))
            metrics.update(_rank_correct(job, cell, t - 1))
            records.append(Record(cell, seed, t, metrics, job))
    return records


def read_sweep(sweep_dir: str) -> list[Record]:
    """Every job under `sweep_dir`; a (cell, seed, round) present in two jobs is counted once."""
    seen, out = set(), []
    for job in sorted(glob.glob(os.path.join(sweep_dir, "*", ""))):
        for rec in read_job(job.rstrip(os.sep)):
            key = (rec.cell, rec.seed, rec.round)
            if key not in seen:
                seen.add(key)
                out.append(rec)
    return out


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds (0 with one seed)
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" + ("" if self.n >= 3 else f" (n={self.n})")


def stat(values: Iterable[float]) -> Stat:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))


def aggregate(records: list[Record], metric: str) -> dict[tuple[Cell, int], Stat]:
    """(cell, round) -> mean ± std over seeds of `metric`."""
    groups: dict[tuple[Cell, int], list[float]] = {}
    for r in records:
        if metric in r.metrics:
            groups.setdefault((r.cell, r.round), []).append(r.metrics[metric])
    return {key: stat(v) for key, v in groups.items()}
