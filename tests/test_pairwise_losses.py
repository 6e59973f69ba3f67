"""LiPO-lambda and all-pairs Bradley-Terry against a float64 reference written from the paper, pair by pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pl_dpo import losses


def numpy_pairwise_nll(scores_BxK, valid_BxK, labels_BxK=None, weighting="none"):
    """Liu et al. 2024, eq. for LiPO-lambda: sum over pairs with label_i > label_j of
    Delta_ij * log(1 + exp(-(s_i - s_j))), Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|,
    G = 2^label - 1, D(tau) = log2(1 + tau), tau the position under the scores (ties: list order)."""
    scores_BxK = np.asarray(scores_BxK, np.float64)
    out = np.zeros(len(scores_BxK))
    for b, (s, v) in enumerate(zip(scores_BxK, valid_BxK)):
        idx = [k for k in range(len(s)) if v[k]]
        if labels_BxK is None:
            label = {k: len(idx) - 1 - pos for pos, k in enumerate(idx)}
        else:
            label = {k: float(labels_BxK[b][k]) for k in idx}
        tau = {k: r + 1 for r, k in enumerate(sorted(idx, key=lambda k: (-s[k], k)))}
        for i in idx:
            for j in idx:
                if label[i] <= label[j]:
                    continue
                w = 1.0
                if weighting == "lambda":
                    gain = abs((2 ** label[i] - 1) - (2 ** label[j] - 1))
                    w = gain * abs(1 / np.log2(1 + tau[i]) - 1 / np.log2(1 + tau[j]))
                out[b] += w * np.logaddexp(0.0, -(s[i] - s[j]))
    return out


def _random(seed, B=48, K=4):
    rng = np.random.default_rng(seed)
    scores = (rng.normal(size=(B, K)) * 3).astype(np.float32)
    valid = rng.random((B, K)) < 0.75
    valid[:, 0] = True
    labels = rng.integers(0, 4, size=(B, K)).astype(np.float32)  # graded, with ties
    return scores, valid, labels


@pytest.mark.parametrize("weighting", ["none", "lambda"])
@pytest.mark.parametrize("K", [2, 3, 4, 6])
def test_matches_float64_reference(weighting, K):
    scores, valid, labels = _random(K, K=K)
    for lab in (None, labels):
        got = losses.pairwise_logistic_nll(
            jnp.asarray(scores), jnp.asarray(valid), None if lab is None else jnp.asarray(lab), weighting
        )
        np.testing.assert_allclose(got, numpy_pairwise_nll(scores, valid, lab, weighting), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["none", "lambda"])
def test_gradients_against_float64_finite_differences(weighting):
    scores, valid, labels = _random(7, B=6, K=4)
    scores = scores.astype(np.float64)

    def ours(s):
        return losses.pairwise_logistic_nll(s, jnp.asarray(valid), jnp.asarray(labels), weighting).sum()

    g = np.asarray(jax.grad(ours)(jnp.asarray(scores, jnp.float32)))
    eps = 1e-6  # small enough that no step crosses a tie of the scores (lambda weights are piecewise constant)
    fd = np.zeros_like(scores)
    for idx in np.ndindex(scores.shape):
        d = np.zeros_like(scores)
        d[idx] = eps
        plus = numpy_pairwise_nll(scores + d, valid, labels, weighting).sum()
        minus = numpy_pairwise_nll(scores - d, valid, labels, weighting).sum()
        fd[idx] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)
    assert np.all(g[~valid] == 0)


def test_k2_is_dpo_up_to_the_stated_constant():
    rng = np.random.default_rng(0)
    pol = jnp.asarray(rng.normal(size=(100, 2)) * 5, jnp.float32)
    ref = jnp.asarray(rng.normal(size=(100, 2)), jnp.float32)
    dpo, _ = losses.pl_dpo_loss(pol, ref, 0.1)
    all_pairs, _ = losses.pl_dpo_loss(pol, ref, 0.1, variant="bt_all_pairs")
    lipo, _ = losses.pl_dpo_loss(pol, ref, 0.1, variant="lipo_lambda")
    np.testing.assert_allclose(all_pairs, dpo, rtol=1e-6)
    np.testing.assert_allclose(lipo, (1 - 1 / np.log2(3)) * dpo, rtol=1e-5)


def test_stable_equal_labels_and_masks():
    scores = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
    got = losses.pairwise_logistic_nll(scores, weighting="lambda")
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(got[1], numpy_pairwise_nll(np.asarray(scores), np.ones((2, 3), bool), None, "lambda")[1])
    # Equal labels carry no preference; a masked response takes part in no pair.
    labels = jnp.array([[2.0, 2.0, 2.0], [1.0, 0.0, 5.0]])
    valid = jnp.array([[True, True, True], [True, True, False]])
    got = losses.pairwise_logistic_nll(jnp.ones((2, 3)), valid, labels)
    np.testing.assert_allclose(got, [0.0, np.log(2.0)], rtol=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        losses.pairwise_logistic_nll(scores, weighting="ndcg")
