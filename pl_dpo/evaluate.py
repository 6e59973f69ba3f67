"""Held-out evaluation of one policy (docs/ARCHITECTURE.md, "Evaluation").

For a policy πθ(t) on the held-out split:
- answer_logp / answer_logp_per_token: log-likelihood of the dataset answers;
- exact_match (synthetic tasks): greedy decoding checked by the task's checker;
- win_rate_vs_sft: per prompt, 1 if πθ(t) is right and πθ(0) wrong, 0.5 on a tie;
- reward_accuracy: implicit-reward ranking accuracy on held-out lists
  [dataset answer, πθ(0)'s greedy answer] (lists where the two differ), with
  reward r(y) = log πθ(t)(y) - log πθ(0)(y), i.e. πθ(0) as the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from pl_dpo import sampler
from pl_dpo.data import Example, PackedBatch, RankedBatch, RankedSet, assemble_ranked, check_answer
from pl_dpo.models import Decoder
from pl_dpo.scoring import score_ranked

BatchType = type[RankedBatch] | type[PackedBatch]  # the layout log-probs are scored in (pl_dpo.data.packing)

# ----------------------------------------------------------------------------- held-out set


@dataclasses.dataclass
class HeldOut:
    """The held-out split, tokenised once per run."""

    examples: list[Example]
    answers: RankedSet  # K=1: prompt + dataset answer
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    checkable: bool  # every example has a task checker (synthetic)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass
class SftBaseline:
    """πθ(0)'s held-out greedy answers, their correctness, and the reference lists."""

    correct: np.ndarray | None
    lists: RankedSet | None  # [answer, πθ(0) answer] where they differ, with ref log-probs


def evaluate_policy(
    model: Decoder,
    heldout: HeldOut,
    tokenizer,
    *,
    batch_size: int,
    max_new_tokens: int,
    baseline: SftBaseline | None,
    batch_type: BatchType,
) -> tuple[dict[str, Any], list[list[int]], np.ndarray | None]:
    """Metrics of one policy; also returns its greedy responses and their correctness.
    `batch_type`: the layout its log-probs are scored in."""
    metrics: dict[str, Any] = {}
    logps_N = score_ranked(model, heldout.answers, batch_size, batch_type=batch_type)[:, 0]
    metrics["answer_logp"] = float(logps_N.mean())
    metrics["answer_logp_per_token"] = _per_token(logps_N, heldout)

    greedy = sampler.SamplingConfig(
        max_new_tokens=max_new_tokens, greedy=True, eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id
    )
    responses = sampler.generate_responses(
        model, heldout.answers.prompts(), greedy, jax.random.key(0), batch_size, tokenizer.eos_token_id
    )
    correct = None
    if heldout.checkable:
        correct = np.array(
            [check_answer(e.task, e.meta, _decode(tokenizer, r)) for e, r in zip(heldout.examples, responses)]
        )
        metrics["exact_match"] = float(correct.mean())
        for task in sorted({e.task for e in heldout.examples}):
            sel = np.array([e.task == task for e in heldout.examples])
            metrics[f"exact_match/{task}"] = float(correct[sel].mean())
        if baseline is not None and baseline.correct is not None:
            wins = correct.astype(float) - baseline.correct.astype(float)
            metrics["win_rate_vs_sft"] = float(np.mean(np.where(wins == 0, 0.5, wins > 0)))
    if baseline is not None and baseline.lists is not None:
        logps = score_ranked(model, baseline.lists, batch_size, batch_type=batch_type)
        reward = logps - baseline.lists.ref_logps_NxK
        metrics["reward_accuracy"] = float(np.mean(reward[:, 0] > reward[:, 1]))
    return metrics, responses, correct


def _per_token(logps_N: np.ndarray, heldout: HeldOut) -> float:
    return float(logps_N.sum() / max(heldout.answers.loss_mask_NxKxL[:, 0].sum(), 1))


def answer_logp_per_token(model: Decoder, heldout: HeldOut, batch_size: int, *, batch_type: BatchType) -> float:
    """The held-out answers' log-likelihood per token (what SFT's early stopping reads)."""
    return _per_token(score_ranked(model, heldout.answers, batch_size, batch_type=batch_type)[:, 0], heldout)


def sft_baseline(
    model: Decoder,
    heldout: HeldOut,
    responses: list[list[int]],
    correct: np.ndarray | None,
    *,
    pad_id: int,
    batch_size: int,
    batch_type: BatchType,
) -> SftBaseline:
    """Reference lists [dataset answer, πθ(0)'s greedy answer] for the reward accuracy."""
    keep = [i for i, r in enumerate(responses) if r and r != heldout.answer_ids[i]]
    lists = None
    if keep:
        lists = assemble_ranked(
            [heldout.prompt_ids[i] for i in keep],
            [[heldout.answer_ids[i], responses[i]] for i in keep],
            pad_id=pad_id,
            k=2,
        )
        lists = lists.replace(ref_logps_NxK=score_ranked(model, lists, batch_size, batch_type=batch_type))
    return SftBaseline(correct=correct, lists=lists)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table, one row per evaluated policy."""

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
