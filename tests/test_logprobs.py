"""Chunked log-prob kernel against a naive float64 computation, and its memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pl_dpo import logprobs


def numpy_token_logprobs(hidden, unembed, targets):
    logits = np.einsum("nld,dv->nlv", hidden.astype(np.float64), unembed.astype(np.float64))
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def random_inputs(seed, N=3, L=37, D=16, V=101, dtype=np.float32):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(N, L, D)).astype(dtype)
    unembed = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(dtype)
    targets = rng.integers(0, V, size=(N, L)).astype(np.int32)
    mask = rng.random((N, L)) < 0.6
    return hidden, unembed, targets, mask


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])  # divides L / does not / = L / > L
def test_values_match_float64(chunk_size):
    hidden, unembed, targets, mask = random_inputs(chunk_size)
    want_tok = numpy_token_logprobs(hidden, unembed, targets)
    got_tok = logprobs.token_logprobs(hidden, unembed, targets, chunk_size=chunk_size)
    np.testing.assert_allclose(got_tok, want_tok, rtol=1e-5, atol=1e-5)
    got_seq = logprobs.sequence_logprobs(hidden, unembed, targets, mask, chunk_size=chunk_size)
    np.testing.assert_allclose(got_seq, (want_tok * mask).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [8, 10])
def test_gradients_match_float64(chunk_size):
    """Gradients w.r.t. hidden states and unembedding, against the analytic float64
    gradient of sum_n w_n * logp_n: d/dlogits = w * mask * (onehot - softmax)."""
    hidden, unembed, targets, mask = random_inputs(7, N=2, L=24, D=8, V=50)
    w = np.array([0.7, -1.3])
    f = lambda h, u: jnp.sum(
        jnp.asarray(w, jnp.float32) * logprobs.sequence_logprobs(h, u, targets, mask, chunk_size=chunk_size)
    )
    g_h, g_u = jax.grad(f, argnums=(0, 1))(hidden, unembed)

    logits = np.einsum("nld,dv->nlv", hidden.astype(np.float64), unembed.astype(np.float64))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(50)[targets]
    d_logits = (w[:, None, None] * mask[..., None]) * (onehot - p)
    np.testing.assert_allclose(g_h, np.einsum("nlv,dv->nld", d_logits, unembed), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_u, np.einsum("nld,nlv->dv", hidden, d_logits), rtol=1e-4, atol=1e-5)


def test_gradients_match_naive_jax():
    hidden, unembed, targets, mask = random_inputs(11)
    f_chunk = lambda h, u: logprobs.sequence_logprobs(h, u, targets, mask, chunk_size=16).sum()
    f_naive = lambda h, u: logprobs.naive_sequence_logprobs(h, u, targets, mask).sum()
    for a, b in zip(jax.grad(f_chunk, (0, 1))(hidden, unembed), jax.grad(f_naive, (0, 1))(hidden, unembed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_accumulate_in_float32():
    hidden, unembed, targets, mask = random_inputs(3, D=64, V=300)
    h16, u16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
    got = logprobs.sequence_logprobs(h16, u16, targets, mask, chunk_size=8)
    assert got.dtype == jnp.float32
    # Reference on the bf16-rounded inputs in float64: only the inputs were rounded.
    want = (numpy_token_logprobs(np.asarray(h16, np.float32), np.asarray(u16, np.float32), targets) * mask).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    g = jax.grad(lambda h: logprobs.sequence_logprobs(h, u16, targets, mask, chunk_size=8).sum())(h16)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_shift_for_next_token():
    tokens = jnp.array([[5, 6, 7, 8]])
    loss_mask = jnp.array([[0, 0, 1, 1]], bool)
    targets, mask = logprobs.shift_for_next_token(tokens, loss_mask)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 0]])
    np.testing.assert_array_equal(mask, [[False, True, True, False]])


def test_shape_errors():
    h = jnp.zeros((2, 5, 4))
    with pytest.raises(ValueError, match="unembedding must be"):
        logprobs.sequence_logprobs(h, jnp.zeros((3, 9)), jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="targets"):
        logprobs.token_logprobs(h, jnp.zeros((4, 9)), jnp.zeros((2, 4), jnp.int32))


def _peak_temp_bytes(fn, N, L, V, D):
    grad_fn = jax.jit(jax.value_and_grad(lambda h, u, t, m: fn(h, u, t, m).sum(), argnums=(0, 1)))
    args = (
        jax.ShapeDtypeStruct((N, L, D), jnp.float32),
        jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((N, L), jnp.int32),
        jax.ShapeDtypeStruct((N, L), jnp.bool_),
    )
    return grad_fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_peak_memory_is_bounded():
    """Forward + backward at N=4, L=1024, V=32768: chunked needs <= 1/4 of naive."""
    N, L, V, D = 4, 1024, 32768, 64
    chunked = _peak_temp_bytes(lambda *a: logprobs.sequence_logprobs(*a, chunk_size=128), N, L, V, D)
    naive = _peak_temp_bytes(logprobs.naive_sequence_logprobs, N, L, V, D)
    full_logits = N * L * V * 4
    assert naive >= full_logits  # the reference really materialises [N, L, V] float32
    assert chunked <= naive / 4, (chunked, naive)


def test_balanced_chunks_pad_least():
    from pl_dpo.logprobs import balanced_chunk

    # As few chunks as chunk_size allows, each as short as it can be: 576 -> 3 x 192 (no padding), not 3 x 256.
    assert [balanced_chunk(n, 256) for n in (576, 56, 1024, 1000, 5)] == [192, 56, 256, 250, 5]
