"""Plackett-Luce DPO losses over K ranked responses (docs/ARCHITECTURE.md, "The math").

A prompt comes with K responses ranked best first. Each response gets the score

    s_k = T * (log pi_theta(y_k | x) - log pi_ref(y_k | x))

and the loss is the Plackett-Luce negative log-likelihood of the observed ranking

    nll = - sum_{k=1}^{K-1} [ s_k - log sum_{j=k}^{K} exp(s_j) ].

K=2 is exactly DPO / SPIN's logistic loss -log sigmoid(s_1 - s_2).

Conventions (all functions are pure and jittable):
- `scores_BxK` and friends are ordered best first along K.
- `valid_BxK` marks responses that exist. A list may be shorter than K; a masked
  response takes part in no sum, wherever it sits in the list.
- A list with fewer than 2 valid responses carries no ranking information: its
  loss is 0, it is left out of the mean and counted in `num_degenerate_lists`.
- A NaN or inf in a *valid* entry propagates into the loss on purpose, so that the
  training loop's non-finite guard stops the run; non-finite values in *masked*
  entries are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

VARIANTS = ("pl", "pl_top_m", "hinge", "lipo_lambda", "bt_all_pairs")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The preference loss of a run: `pl_dpo_loss(..., T, variant=variant, top_m=top_m)`."""

    T: float
    variant: str = "pl"
    top_m: int | None = None
    # Weight of the token-mean NLL of each list's rank-1 response added to the loss (RPO / TRL's
    # "sft" term): an anchor against the falling likelihood of the preferred answers. 0: off.
    sft_weight: float = 0.0


# Masked scores are replaced by this finite value rather than -inf: it vanishes in
# every logsumexp (exp underflows to exactly 0) yet keeps gradients finite, which
# -inf would not (logaddexp(-inf, -inf) has a NaN gradient).
_MASKED_SCORE = -1e30


def _as_valid(scores_BxK: jax.Array, valid_BxK: jax.Array | None) -> jax.Array:
    if scores_BxK.ndim != 2:
        raise ValueError(f"scores must be [B, K], got shape {scores_BxK.shape}")
    if valid_BxK is None:
        return jnp.ones(scores_BxK.shape, dtype=bool)
    if valid_BxK.shape != scores_BxK.shape:
        raise ValueError(f"valid mask shape {valid_BxK.shape} does not match scores shape {scores_BxK.shape}")
    return valid_BxK.astype(bool)


def plackett_luce_nll(
    scores_BxK: jax.Array,
    valid_BxK: jax.Array | None = None,
    top_m: int | None = None,
) -> jax.Array:
    """Per-list Plackett-Luce negative log-likelihood, shape [B].

    Args:
      scores_BxK: scores, best response first.
      valid_BxK: which responses exist (default: all).
      top_m: if given, only the first `top_m` stages of the Plackett-Luce product
        (the top-m ranking likelihood); `None` means all K-1 stages.
    """
    valid_BxK = _as_valid(scores_BxK, valid_BxK)
    scores_BxK = scores_BxK.astype(jnp.promote_types(scores_BxK.dtype, jnp.float32))
    masked_BxK = jnp.where(valid_BxK, scores_BxK, _MASKED_SCORE)
    # lse_BxK[:, k] = log sum_{j >= k, valid} exp(s_j): a reverse cumulative logsumexp,
    # computed as an associative scan of logaddexp, so it is exact for |s| ~ 1e4.
    lse_BxK = jax.lax.cumlogsumexp(masked_BxK, axis=1, reverse=True)
    stage_BxK = masked_BxK - lse_BxK
    take_BxK = valid_BxK
    if top_m is not None:
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        # Stage index counts valid responses only: the m-th stage is the m-th valid one.
        stage_idx_BxK = jnp.cumsum(valid_BxK, axis=1) - 1
        take_BxK = take_BxK & (stage_idx_BxK < top_m)
    return -jnp.sum(jnp.where(take_BxK, stage_BxK, 0.0), axis=1)


def hinge_nll(scores_BxK: jax.Array, valid_BxK: jax.Array | None = None) -> jax.Array:
    """SPIN's hinge variant for K=2: relu(1 - (s_1 - s_2)), shape [B]."""
    valid_BxK = _as_valid(scores_BxK, valid_BxK)
    if scores_BxK.shape[1] != 2:
        raise ValueError(f"the hinge variant is defined for K=2, got K={scores_BxK.shape[1]}")
    margin_B = jnp.where(valid_BxK.all(axis=1), scores_BxK[:, 0] - scores_BxK[:, 1], 1.0)
    return jax.nn.relu(1.0 - margin_B)


def rank_labels(valid_BxK: jax.Array) -> jax.Array:
    """Graded labels from the ranking alone: the number of valid responses ranked below each one."""
    valid_BxK = valid_BxK.astype(bool)
    return jnp.where(valid_BxK, valid_BxK.sum(axis=1, keepdims=True) - jnp.cumsum(valid_BxK, axis=1), 0)


def lambda_weights(scores_BxK: jax.Array, labels_BxK: jax.Array, valid_BxK: jax.Array) -> jax.Array:
    """LiPO-lambda's pair weights [B, K, K]: |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|.

    G = 2^label - 1 is the gain, D(tau) = log2(1 + tau) the discount of the 1-based position
    tau of a response when the valid responses are sorted by the current scores (ties broken by
    list order). The weights are constants of the step (no gradient flows through them)."""
    scores_BxK = jax.lax.stop_gradient(scores_BxK)
    K = scores_BxK.shape[1]
    idx_K = jnp.arange(K)
    # tau_i = 1 + #{valid j ahead of i}: j scores higher, or equal and earlier in the list.
    ahead_BxKxK = (scores_BxK[:, None, :] > scores_BxK[:, :, None]) | (
        (scores_BxK[:, None, :] == scores_BxK[:, :, None]) & (idx_K[None, :] < idx_K[:, None])[None]
    )
    tau_BxK = 1 + jnp.sum(ahead_BxKxK & valid_BxK[:, None, :], axis=2)
    inv_discount_BxK = 1.0 / jnp.log2(1.0 + tau_BxK.astype(jnp.float32))
    gain_BxK = jnp.exp2(labels_BxK.astype(jnp.float32)) - 1.0
    return jnp.abs(gain_BxK[:, :, None] - gain_BxK[:, None, :]) * jnp.abs(
        inv_discount_BxK[:, :, None] - inv_discount_BxK[:, None, :]
    )


def pairwise_logistic_nll(
    scores_BxK: jax.Array,
    valid_BxK: jax.Array | None = None,
    labels_BxK: jax.Array | None = None,
    weighting: str = "none",
) -> jax.Array:
    """Per-list sum over ordered pairs (i better than j) of w_ij * -log sigmoid(s_i - s_j), shape [B].

    "Better" is a higher label (`labels_BxK`, graded: ratings, verifier scores); without labels,
    earlier in the list (`rank_labels`). Pairs with equal labels carry no preference and are
    skipped. `weighting`: "none" (w = 1, every pair: "bt_all_pairs") or "lambda" (LiPO-lambda,
    Liu et al. 2024, `lambda_weights`). For K=2 with rank labels, "none" is exactly the DPO
    loss -log sigmoid(s_1 - s_2) and "lambda" is (1 - 1/log2(3)) ~ 0.369 times it.
    """
    valid_BxK = _as_valid(scores_BxK, valid_BxK)
    scores_BxK = scores_BxK.astype(jnp.promote_types(scores_BxK.dtype, jnp.float32))
    labels_BxK = rank_labels(valid_BxK) if labels_BxK is None else labels_BxK
    better_BxKxK = (labels_BxK[:, :, None] > labels_BxK[:, None, :]) & valid_BxK[:, :, None] & valid_BxK[:, None, :]
    diff_BxKxK = jnp.where(better_BxKxK, scores_BxK[:, :, None] - scores_BxK[:, None, :], 0.0)
    nll_BxKxK = jax.nn.softplus(-diff_BxKxK)  # -log sigmoid, stable for |s| ~ 1e4
    if weighting == "lambda":
        nll_BxKxK = nll_BxKxK * lambda_weights(scores_BxK, labels_BxK, valid_BxK)
    elif weighting != "none":
        raise ValueError(f"weighting must be 'none' or 'lambda', got {weighting!r}")
    return jnp.sum(jnp.where(better_BxKxK, nll_BxKxK, 0.0), axis=(1, 2))


def _check_temperature(T: Any) -> None:
    # A traced T (swept without recompiling) cannot be checked here; configs check it.
    if isinstance(T, (int, float)) and not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def pl_dpo_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    T: float | jax.Array,
    valid: jax.Array | None = None,
    variant: str = "pl",
    top_m: int | None = None,
    labels: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Plackett-Luce DPO loss of a batch of ranked lists and its metrics.

    Args:
      policy_logps: [B, K] summed response log-probs under the policy, best first.
      ref_logps: [B, K] the same under the frozen reference.
      T: KL temperature (DPO's beta), > 0.
      valid: [B, K] bool, which responses exist.
      variant: "pl" (full Plackett-Luce), "pl_top_m" (first `top_m` stages),
        "hinge" (SPIN's hinge, K=2), "lipo_lambda" (LiPO-lambda: lambda-weighted
        pairwise logistic terms) or "bt_all_pairs" (unweighted, every ordered pair);
        see `pairwise_logistic_nll`.
      top_m: number of stages for "pl_top_m".
      labels: [B, K] graded labels for the pairwise variants (higher is better);
        None: derived from the ranking.

    Returns:
      (loss, metrics): the mean loss over lists with >= 2 valid responses, and a
      dict of device arrays (no host sync) described in `ranking_metrics`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"policy_logps {policy_logps.shape} and ref_logps {ref_logps.shape} differ in shape")
    if variant == "pl_top_m" and top_m is None:
        raise ValueError("variant 'pl_top_m' needs top_m (number of Plackett-Luce stages)")
    _check_temperature(T)
    valid_BxK = _as_valid(policy_logps, valid)

    policy_BxK = policy_logps.astype(jnp.float32)
    ref_BxK = ref_logps.astype(jnp.float32)
    # Zero masked entries first so a NaN in a padding slot cannot reach any sum.
    scores_BxK = jnp.where(valid_BxK, T * (policy_BxK - ref_BxK), 0.0)

    if variant == "hinge":
        nll_B = hinge_nll(scores_BxK, valid_BxK)
    elif variant in ("lipo_lambda", "bt_all_pairs"):
        weighting = "lambda" if variant == "lipo_lambda" else "none"
        nll_B = pairwise_logistic_nll(scores_BxK, valid_BxK, labels, weighting)
    else:
        nll_B = plackett_luce_nll(scores_BxK, valid_BxK, top_m if variant == "pl_top_m" else None)

    informative_B = valid_BxK.sum(axis=1) >= 2
    num_lists = informative_B.sum()
    loss = jnp.sum(jnp.where(informative_B, nll_B, 0.0)) / jnp.maximum(num_lists, 1)

    metrics = ranking_metrics(scores_BxK, valid_BxK)
    metrics["loss"] = loss
    metrics["policy_logps_K"] = _masked_mean(jnp.where(valid_BxK, policy_BxK, 0.0), valid_BxK)
    metrics["ref_logps_K"] = _masked_mean(jnp.where(valid_BxK, ref_BxK, 0.0), valid_BxK)
    return loss, metrics


def _masked_mean(x_BxK: jax.Array, mask_BxK: jax.Array) -> jax.Array:
    """Mean over the batch per position, counting only masked-in entries. [K]."""
    return jnp.sum(jnp.where(mask_BxK, x_BxK, 0.0), axis=0) / jnp.maximum(mask_BxK.sum(axis=0), 1)


def ranking_metrics(scores_BxK: jax.Array, valid_BxK: jax.Array) -> dict[str, jax.Array]:
    """Metrics of how well the scores reproduce the ranking (device arrays).

    - scores_K: mean score per rank position.
    - margins_Km1: mean s_k - s_{k+1} over lists where both are valid.
    - pairwise_accuracy: fraction of ordered valid pairs (i < j) with s_i > s_j.
    - exact_ranking_accuracy: fraction of informative lists whose valid scores are
      strictly decreasing.
    - num_lists / num_degenerate_lists: lists with >= 2 / < 2 valid responses.
    """
    K = scores_BxK.shape[1]
    informative_B = valid_BxK.sum(axis=1) >= 2
    pair_valid_BxKxK = valid_BxK[:, :, None] & valid_BxK[:, None, :]
    upper_KxK = jnp.triu(jnp.ones((K, K), dtype=bool), k=1)  # pairs i < j
    pairs_BxKxK = pair_valid_BxKxK & upper_KxK
    correct_BxKxK = scores_BxK[:, :, None] > scores_BxK[:, None, :]
    num_pairs = pairs_BxKxK.sum()
    pairwise_accuracy = jnp.sum(correct_BxKxK & pairs_BxKxK) / jnp.maximum(num_pairs, 1)
    exact_B = jnp.all(correct_BxKxK | ~pairs_BxKxK, axis=(1, 2)) & informative_B

    neighbours_BxKm1 = valid_BxK[:, :-1] & valid_BxK[:, 1:]
    margins_BxKm1 = scores_BxK[:, :-1] - scores_BxK[:, 1:]
    num_lists = informative_B.sum()
    return {
        "scores_K": _masked_mean(scores_BxK, valid_BxK),
        "margins_Km1": _masked_mean(margins_BxKm1, neighbours_BxKm1),
        "pairwise_accuracy": pairwise_accuracy,
        "exact_ranking_accuracy": exact_B.sum() / jnp.maximum(num_lists, 1),
        "num_lists": num_lists,
        "num_degenerate_lists": scores_BxK.shape[0] - num_lists,
    }
