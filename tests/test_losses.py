"""Plackett-Luce losses against independent references (rax, float64 numpy, DPO)."""

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import pytest
import rax

from pl_dpo import losses


def numpy_pl_nll(scores_BxK: np.ndarray, valid_BxK: np.ndarray | None = None, top_m=None):
    """Float64 reference written straight from the formula (docs/ARCHITECTURE.md, "The math"), one list at a time."""
    scores_BxK = np.asarray(scores_BxK, np.float64)
    if valid_BxK is None:
        valid_BxK = np.ones(scores_BxK.shape, bool)
    out = []
    for s, v in zip(scores_BxK, valid_BxK):
        s = s[v]  # masked responses take part in no sum
        stages = len(s) - 1 if top_m is None else min(top_m, len(s) - 1)
        nll = 0.0
        for k in range(max(stages, 0)):
            tail = s[k:]
            m = tail.max()
            nll -= s[k] - (m + np.log(np.exp(tail - m).sum()))
        out.append(nll)
    return np.array(out)


def random_valid(rng, shape, min_valid=1):
    valid = rng.random(shape) < 0.7
    valid[:, :min_valid] = True
    return valid


@pytest.mark.parametrize("K", [2, 3, 4, 7])
def test_matches_numpy_float64_and_rax(K):
    rng = np.random.default_rng(K)
    scores = rng.normal(size=(64, K)).astype(np.float32) * 3
    for valid in (None, random_valid(rng, scores.shape)):
        got = np.asarray(losses.plackett_luce_nll(jnp.asarray(scores), None if valid is None else jnp.asarray(valid)))
        np.testing.assert_allclose(got, numpy_pl_nll(scores, valid), rtol=1e-5, atol=1e-5)
        # rax ranks by labels; labels K-1 ... 0 say "position 0 is best".
        labels = np.broadcast_to(np.arange(K)[::-1], scores.shape).astype(np.float32)
        want = rax.listmle_loss(jnp.asarray(scores), jnp.asarray(labels), where=valid, reduce_fn=None)
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_k2_is_dpo_logistic_loss():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(100, 2)) * 5, jnp.float32)
    got = losses.plackett_luce_nll(scores)
    want = -jax.nn.log_sigmoid(scores[:, 0] - scores[:, 1])  # TRL's sigmoid DPO loss
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pl_dpo_loss_k2_equals_trl_formula():
    rng = np.random.default_rng(1)
    pol = jnp.asarray(rng.normal(size=(16, 2)) * 10 - 50, jnp.float32)
    ref = jnp.asarray(rng.normal(size=(16, 2)) * 10 - 50, jnp.float32)
    beta = 0.1
    loss, _ = losses.pl_dpo_loss(pol, ref, beta)
    logits = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
    np.testing.assert_allclose(loss, jnp.mean(-jax.nn.log_sigmoid(beta * logits)), rtol=1e-6)


def test_permutation_behaviour():
    """Reordering the list changes the loss exactly as the reference does; the ranking
    sorted by score has the smallest loss of all permutations."""
    rng = np.random.default_rng(2)
    s = rng.normal(size=4).astype(np.float32)
    perms = np.array(list(itertools.permutations(range(4))))
    scores = s[perms]
    got = np.asarray(losses.plackett_luce_nll(jnp.asarray(scores)))
    np.testing.assert_allclose(got, numpy_pl_nll(scores), rtol=1e-5, atol=1e-6)
    assert np.argmin(got) == np.where((perms == np.argsort(-s)).all(axis=1))[0][0]
    # The Plackett-Luce probabilities of all K! rankings sum to one.
    np.testing.assert_allclose(np.exp(-got).sum(), 1.0, rtol=1e-5)


def test_stable_at_1e4():
    scores = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [1e4, 1e4 - 1, -1e4]], jnp.float32)
    got = losses.plackett_luce_nll(scores)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, numpy_pl_nll(np.asarray(scores)), rtol=1e-5, atol=1e-3)
    grads = jax.grad(lambda s: losses.plackett_luce_nll(s).sum())(scores)
    assert np.all(np.isfinite(grads))


def test_gradients_against_float64_finite_differences():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 4))
    valid = random_valid(rng, scores.shape, min_valid=2)
    g = np.asarray(
        jax.grad(lambda s: losses.plackett_luce_nll(s, jnp.asarray(valid)).sum())(jnp.asarray(scores, jnp.float32))
    )
    eps = 1e-6
    fd = np.zeros_like(scores)
    for idx in np.ndindex(scores.shape):
        d = np.zeros_like(scores)
        d[idx] = eps
        fd[idx] = (numpy_pl_nll(scores + d, valid).sum() - numpy_pl_nll(scores - d, valid).sum()) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)
    assert np.all(g[~valid] == 0)


def test_check_grads_of_pl_dpo_loss():
    rng = np.random.default_rng(4)
    pol = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    f = lambda p: losses.pl_dpo_loss(p, ref, 0.5)[0]
    jax.test_util.check_grads(f, (pol,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_masked_entries_take_part_in_no_sum():
    scores = jnp.array([[2.0, 99.0, 1.0, -99.0]])
    valid = jnp.array([[True, False, True, False]])
    np.testing.assert_allclose(
        losses.plackett_luce_nll(scores, valid), losses.plackett_luce_nll(scores[:, [0, 2]]), rtol=1e-6
    )


def test_top_m_and_hinge_variants():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(32, 4)).astype(np.float32)
    valid = random_valid(rng, scores.shape)
    got = losses.plackett_luce_nll(jnp.asarray(scores), jnp.asarray(valid), top_m=1)
    np.testing.assert_allclose(got, numpy_pl_nll(scores, valid, top_m=1), rtol=1e-5, atol=1e-6)
    # top_m >= K-1 is the full loss.
    np.testing.assert_allclose(
        losses.plackett_luce_nll(jnp.asarray(scores), top_m=3), losses.plackett_luce_nll(jnp.asarray(scores))
    )
    pol, ref = jnp.asarray(scores[:, :2]), jnp.zeros((32, 2))
    loss, _ = losses.pl_dpo_loss(pol, ref, 2.0, variant="hinge")
    np.testing.assert_allclose(loss, np.mean(np.maximum(0, 1 - 2 * (scores[:, 0] - scores[:, 1]))), rtol=1e-6)
    loss_top, _ = losses.pl_dpo_loss(jnp.asarray(scores), jnp.zeros((32, 4)), 1.0, variant="pl_top_m", top_m=2)
    np.testing.assert_allclose(loss_top, np.mean(numpy_pl_nll(scores, top_m=2)), rtol=1e-5)


def test_bad_config_errors():
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="valid variants: pl, pl_top_m, hinge, lipo_lambda, bt_all_pairs"):
        losses.pl_dpo_loss(s, s, 0.1, variant="ipo")
    with pytest.raises(ValueError, match="T must be > 0"):
        losses.pl_dpo_loss(s, s, 0.0)
    with pytest.raises(ValueError, match="T must be > 0"):
        losses.pl_dpo_loss(s, s, float("nan"))
    with pytest.raises(ValueError, match="K=2"):
        losses.pl_dpo_loss(s, s, 0.1, variant="hinge")
    with pytest.raises(ValueError, match="differ in shape"):
        losses.pl_dpo_loss(s, jnp.zeros((2, 2)), 0.1)
    with pytest.raises(ValueError, match="needs top_m"):
        losses.pl_dpo_loss(s, s, 0.1, variant="pl_top_m")


def test_degenerate_lists_contribute_zero_and_are_counted():
    rng = np.random.default_rng(6)
    pol = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    valid = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    loss, metrics = losses.pl_dpo_loss(pol, jnp.zeros_like(pol), 1.0, valid)
    want = numpy_pl_nll(np.asarray(pol), np.asarray(valid))[[0, 3]].mean()
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert int(metrics["num_lists"]) == 2 and int(metrics["num_degenerate_lists"]) == 2
    # No informative list at all: loss 0 with finite gradients.
    loss0, _ = losses.pl_dpo_loss(pol, pol, 1.0, valid.at[:].set(False).at[:, 0].set(True))
    assert float(loss0) == 0.0


def test_nan_treatment():
    """NaN in a valid entry reaches the loss (the train loop's guard stops the run);
    NaN in a masked entry is ignored, gradients included."""
    pol = jnp.array([[1.0, jnp.nan, 0.5]])
    loss, _ = losses.pl_dpo_loss(pol, jnp.zeros((1, 3)), 1.0)
    assert np.isnan(loss)
    valid = jnp.array([[True, False, True]])
    loss, _ = losses.pl_dpo_loss(pol, jnp.zeros((1, 3)), 1.0, valid)
    g = jax.grad(lambda p: losses.pl_dpo_loss(p, jnp.zeros((1, 3)), 1.0, valid)[0])(pol)
    assert np.isfinite(loss) and np.all(np.isfinite(g))


def test_metrics():
    pol = jnp.array([[3.0, 2.0, 1.0], [1.0, 2.0, 0.0], [5.0, 1.0, 9.0]])
    valid = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
    _, m = losses.pl_dpo_loss(pol, jnp.zeros_like(pol), 1.0, valid)
    # Ordered pairs by hand: row0 (3,2),(3,1),(2,1) all correct; row1 (1,2) no,(1,0) yes,(2,0) yes; row2 (5,1) yes.
    np.testing.assert_allclose(m["pairwise_accuracy"], 6 / 7)
    np.testing.assert_allclose(m["exact_ranking_accuracy"], 2 / 3)
    np.testing.assert_allclose(m["scores_K"], [3.0, 5 / 3, 0.5])
    np.testing.assert_allclose(m["margins_Km1"], [(1 - 1 + 4) / 3, (1 + 2) / 2])
    np.testing.assert_allclose(m["policy_logps_K"], m["scores_K"])


finite_scores = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 8), st.integers(2, 6)), elements=st.floats(-1e4, 1e4, width=32)
)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(finite_scores, st.floats(-1e3, 1e3, width=32))
def test_property_shift_invariance_and_nonnegativity(scores, shift):
    base = np.asarray(losses.plackett_luce_nll(jnp.asarray(scores)))
    shifted = np.asarray(losses.plackett_luce_nll(jnp.asarray(scores + np.float32(shift))))
    assert np.all(np.isfinite(base)) and np.all(base >= -1e-3)
    # float32 rounding of s + shift is ~ulp(1e4) ~ 1e-3 per score.
    np.testing.assert_allclose(shifted, base, atol=5e-2 + 1e-6 * np.abs(base).max())


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 5)), elements=st.floats(-30, 30)), st.data()
)
def test_property_matches_float64_reference_with_masks(scores, data):
    valid = data.draw(hnp.arrays(bool, scores.shape))
    got = np.asarray(losses.plackett_luce_nll(jnp.asarray(scores, jnp.float32), jnp.asarray(valid)))
    np.testing.assert_allclose(got, numpy_pl_nll(scores.astype(np.float32), valid), rtol=1e-4, atol=1e-4)
