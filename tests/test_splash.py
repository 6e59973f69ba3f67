"""Splash attention (Pallas TPU kernel, here in interpret mode) against the einsum path: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pl_dpo import scoring, sharding
from pl_dpo.models import create_model, preset_config
from pl_dpo.models.layers import attention
from pl_dpo.models.splash import splash_attention

B, T, N, KV, H = 3, 40, 4, 2, 16  # GQA: 4 query heads share 2 key/value heads


def valid_rows(kind: str) -> np.ndarray:
    lengths = np.array([40, 23, 9])
    slots = np.arange(T)[None, :]
    if kind == "right":
        return slots < lengths[:, None]
    return slots >= (T - lengths)[:, None]  # left padding (prompts for generation)


def dense_mask(valid_BxT: np.ndarray, window: int | None) -> np.ndarray:
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    causal = (j <= i) if window is None else (j <= i) & (i - j < window)
    return (valid_BxT[:, None, :] & causal[None]) | np.eye(T, dtype=bool)[None]


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("window", [None, 7])
def test_values_and_gradients_match_einsum(padding, window):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, heads, H)), jnp.float32) for heads in (N, KV, KV))
    valid = valid_rows(padding)
    real = jnp.asarray(valid)[..., None, None]  # only real queries' outputs are used

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(real, out * jnp.cos(out), 0.0)), out

    def einsum(q, k, v):
        return attention(q, k, v, jnp.asarray(dense_mask(valid, window)), "einsum")

    def splash(q, k, v):
        return splash_attention(q, k, v, jnp.asarray(valid), window=window, interpret=True)

    (la, out_a), grads_a = jax.value_and_grad(lambda *x: loss(einsum, *x), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (lb, out_b), grads_b = jax.value_and_grad(lambda *x: loss(splash, *x), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.where(real, out_b, 0), np.where(real, out_a, 0), rtol=1e-5, atol=1e-5)
    # A sum of ~4600 float32 terms of either sign: its rounding error is absolute, not relative to the sum.
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-5)


def test_decoder_with_splash_scores_like_einsum_in_both_layouts():
    from test_packing import both_layouts, ranked_lists

    _, _, arrays = ranked_lists(n=4, seed=8)
    for batch in both_layouts(arrays):  # packed batches keep the einsum path's prefix-sharing mask
        logps = {}
        for impl in ("einsum", "splash"):
            cfg = preset_config("tiny-mistral", vocab_size=96, sliding_window=6, attention_impl=impl)
            logps[impl] = np.asarray(scoring.batch_logps(create_model(cfg, seed=9), batch, chunk_size=8))
        valid = np.asarray(batch.valid_BxK)
        np.testing.assert_allclose(np.where(valid, logps["splash"], 0), np.where(valid, logps["einsum"], 0), rtol=1e-5)


def test_shard_map_over_the_mesh_matches_one_device():
    """With a mesh set, the kernel runs under shard_map: batch over (data, fsdp), heads over tensor."""
    rng = np.random.default_rng(1)
    b = 4
    q, k, v = (jnp.asarray(rng.normal(size=(b, T, heads, H)), jnp.float32) for heads in (N, KV, KV))
    valid = jnp.asarray(np.arange(T)[None, :] < np.array([40, 30, 20, 10])[:, None])
    expected = splash_attention(q, k, v, valid, interpret=True)
    mesh = sharding.make_mesh(2, 2, 2)
    run = lambda *x: splash_attention(*x, interpret=True)  # noqa: E731
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, valid))
        got = jax.jit(run)(q, k, v, valid)
    real = np.asarray(valid)[..., None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, expected, 0), rtol=1e-6, atol=1e-6)


def test_one_shape_traced_again_in_another_program():
    """The kernel of a shape is built once and reused by every later trace (a training step's gradient,
    then scoring's forward, as a round runs them), inside and outside shard_map: it holds no tracer."""
    rng = np.random.default_rng(2)
    b, t = 4, 24  # a shape no other test builds, so the cached kernel is made inside the first trace
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, H)), jnp.float32) for heads in (N, KV, KV))
    valid = jnp.asarray(np.arange(t)[None, :] < np.array([24, 20, 11, 3])[:, None])
    run = lambda *x: splash_attention(*x, interpret=True)  # noqa: E731
    loss = lambda q, k, v, m: jnp.sum(run(q, k, v, m))  # noqa: E731
    with jax.set_mesh(sharding.make_mesh(2, 2, 2)):
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, valid)
        sharded = jax.jit(run)(q, k, v, valid)
    plain = jax.jit(run)(q, k, v, valid)
    real = np.asarray(valid)[..., None, None]
    np.testing.assert_allclose(np.where(real, sharded, 0), np.where(real, plain, 0), rtol=1e-6, atol=1e-6)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
