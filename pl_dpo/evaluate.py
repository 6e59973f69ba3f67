"""Per-round evaluation (DESIGN.md §6) and batched scoring of ranked sets.

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
from flax import nnx

from pl_dpo import sampler, sharding
from pl_dpo.data import BatchIterator, Example, assemble_ranked, check_answer, prompt_batches, trim_at_eos
from pl_dpo.models import Decoder
from pl_dpo.train import list_logps

# ----------------------------------------------------------------------------- scoring


@jax.jit
def _score_batch(graphdef, params, tokens_BxKxL, loss_mask_BxKxL, attn_valid_BxKxL, positions_BxKxL):
    return list_logps(nnx.merge(graphdef, params), tokens_BxKxL, loss_mask_BxKxL, attn_valid_BxKxL, positions_BxKxL)


def score_ranked(
    model: Decoder, arrays: dict[str, np.ndarray], batch_size: int, length_buckets: tuple[int, ...] | None = None
) -> np.ndarray:
    """Summed response log-probs [N, K] of a ranked set under `model` (0 where invalid).

    These are the reference log-probs of a round when `model` is πθ(t). One length
    bucket (the arrays' L) by default: scoring is not a hot path, a compile is."""
    graphdef, params = nnx.split(model)
    n, k, _ = arrays["tokens_NxKxL"].shape
    out = np.zeros((n, k), np.float32)
    it = BatchIterator(
        {**arrays, "example_ids_N": np.arange(n, dtype=np.int64)},
        batch_size=batch_size,
        shuffle=False,
        drop_remainder=False,
        num_epochs=1,
        length_buckets=length_buckets or (arrays["tokens_NxKxL"].shape[-1],),
    )
    replicated = sharding.replicated_like(params)
    for batch in it:
        fields = (batch.tokens_BxKxL, batch.loss_mask_BxKxL, batch.attn_valid_BxKxL, batch.positions_BxKxL)
        logps = _score_batch(graphdef, params, *(sharding.put_replicated(x, replicated) for x in fields))
        real = batch.example_ids_B >= 0
        out[batch.example_ids_B[real]] = sharding.to_host(logps)[real]
    return np.where(arrays["valid_NxK"], out, 0.0).astype(np.float32)


def generate_responses(
    model: Decoder,
    arrays: dict[str, np.ndarray],
    sampling: sampler.SamplingConfig,
    rng: jax.Array,
    batch_size: int,
    eos_id: int,
    progress=None,
) -> list[list[int]]:
    """One response (token ids, EOS included when reached) per prompt of `arrays`."""
    n = arrays["prompt_tokens_NxP"].shape[0]
    out: list[list[int] | None] = [None] * n
    for i, batch in enumerate(prompt_batches(arrays, batch_size=batch_size)):
        gen = sampler.generate(
            model, batch.prompt_tokens_BxP, batch.prompt_valid_BxP, jax.random.fold_in(rng, i), sampling
        )
        tokens, lengths = sharding.to_host(gen.tokens_BxT), sharding.to_host(gen.lengths_B)
        for row, ex in enumerate(batch.example_ids_B):
            if ex >= 0:
                out[ex] = trim_at_eos(tokens[row, : lengths[row]].tolist(), eos_id)
        if progress is not None:
            progress.update(int((batch.example_ids_B >= 0).sum()))
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- held-out set


@dataclasses.dataclass
class HeldOut:
    """The held-out split, tokenised once per run."""

    examples: list[Example]
    arrays: dict[str, np.ndarray]  # K=1: prompt + dataset answer
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    checkable: bool  # every example has a task checker (synthetic)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass
class SftBaseline:
    """πθ(0)'s held-out greedy answers, their correctness, and the reference lists."""

    correct: np.ndarray | None
    lists: dict[str, np.ndarray] | None  # [answer, πθ(0) answer] where they differ, with ref log-probs


def evaluate_policy(
    model: Decoder, heldout: HeldOut, tokenizer, *, batch_size: int, max_new_tokens: int, baseline: SftBaseline | None
) -> tuple[dict[str, Any], list[list[int]], np.ndarray | None]:
    """Metrics of one policy; also returns its greedy responses and their correctness."""
    metrics: dict[str, Any] = {}
    logps_N = score_ranked(model, heldout.arrays, batch_size)[:, 0]
    num_tokens = heldout.arrays["loss_mask_NxKxL"][:, 0].sum(-1)
    metrics["answer_logp"] = float(logps_N.mean())
    metrics["answer_logp_per_token"] = float(logps_N.sum() / max(num_tokens.sum(), 1))

    greedy = sampler.SamplingConfig(
        max_new_tokens=max_new_tokens, greedy=True, eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id
    )
    responses = generate_responses(model, heldout.arrays, greedy, jax.random.key(0), batch_size, tokenizer.eos_token_id)
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
        logps = score_ranked(model, baseline.lists, batch_size)
        reward = logps - baseline.lists["ref_logps_NxK"]
        metrics["reward_accuracy"] = float(np.mean(reward[:, 0] > reward[:, 1]))
    return metrics, responses, correct


def sft_baseline(
    model: Decoder,
    heldout: HeldOut,
    responses: list[list[int]],
    correct: np.ndarray | None,
    *,
    pad_id: int,
    batch_size: int,
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
        lists["ref_logps_NxK"] = score_ranked(model, lists, batch_size)
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
