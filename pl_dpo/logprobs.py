"""Memory-bounded log-probabilities of target tokens from final hidden states.

The naive route (`logits = hidden @ W`, `log_softmax`, gather) materialises a
float32 `[N, L, V]` tensor in the forward pass and another in the backward pass;
at Llama-3 vocabularies (V = 128256) that is the largest buffer of a DPO step.
Here the sequence is cut into chunks of `chunk_size` positions and a `lax.scan`
walks over them with a rematerialised body: each chunk's logits exist only inside
one iteration, forward and backward, so peak temporary memory is
O(N x chunk_size x V) instead of O(N x L x V).

Token alignment is the caller's business: `targets_NxL[:, i]` is the token whose
log-probability is read from `hidden_NxLxD[:, i]` (for a causal LM that is
`tokens[:, i + 1]`; see `shift_for_next_token`).

bf16 hidden states and unembedding are fine: the matmul accumulates in float32
(`preferred_element_type`) and the log-softmax is done in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 256


def shift_for_next_token(tokens_NxL: jax.Array, loss_mask_NxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets and mask aligned with hidden states of a causal LM.

    Position i of the hidden states predicts token i+1, so the target of position i
    is `tokens[i+1]`, counted when `loss_mask[i+1]` is set (the mask marks the
    tokens that are scored, e.g. the response tokens). The last position predicts
    nothing.
    """
    targets_NxL = jnp.concatenate([tokens_NxL[:, 1:], jnp.zeros_like(tokens_NxL[:, :1])], axis=1)
    mask_NxL = jnp.concatenate([loss_mask_NxL[:, 1:], jnp.zeros_like(loss_mask_NxL[:, :1])], axis=1).astype(bool)
    return targets_NxL, mask_NxL


def _chunk_logits(hidden_NxCxD: jax.Array, unembed_DxV: jax.Array) -> jax.Array:
    return jnp.einsum("ncd,dv->ncv", hidden_NxCxD, unembed_DxV, preferred_element_type=jnp.float32)


def _target_logprobs(logits_NxCxV: jax.Array, targets_NxC: jax.Array) -> jax.Array:
    lse_NxC = jax.nn.logsumexp(logits_NxCxV, axis=-1)
    target_logit_NxC = jnp.take_along_axis(logits_NxCxV, targets_NxC[..., None], axis=-1)[..., 0]
    return target_logit_NxC - lse_NxC


def _chunk_token_logprobs(hidden_NxCxD: jax.Array, unembed_DxV: jax.Array, targets_NxC: jax.Array) -> jax.Array:
    """log softmax(hidden @ W)[target] for one chunk, float32. [N, C]."""
    return _target_logprobs(_chunk_logits(hidden_NxCxD, unembed_DxV), targets_NxC)


def balanced_chunk(length: int, chunk_size: int) -> int:
    """The chunk length <= `chunk_size` that cuts `length` into as few chunks with the least padding:
    576 positions at chunk_size 256 become 3 chunks of 192, not 3 of 256 (a third of them padding)."""
    num_chunks = -(-length // max(min(chunk_size, length), 1))
    return -(-length // num_chunks)


def _to_chunks(x_NxL: jax.Array, chunk_size: int) -> jax.Array:
    """[N, L, ...] -> [L/C, N, C, ...] with zero padding of L up to a multiple of C."""
    n, length = x_NxL.shape[:2]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    if pad:
        x_NxL = jnp.pad(x_NxL, [(0, 0), (0, pad)] + [(0, 0)] * (x_NxL.ndim - 2))
    x = x_NxL.reshape((n, num_chunks, chunk_size) + x_NxL.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x_KxNxC: jax.Array, length: int) -> jax.Array:
    """The inverse of `_to_chunks`: [N, L] from [L/C, N, C], the padding cut."""
    return jnp.moveaxis(x_KxNxC, 0, 1).reshape(x_KxNxC.shape[1], -1)[:, :length]


def _check_shapes(hidden_NxLxD: jax.Array, unembed_DxV: jax.Array, targets_NxL: jax.Array) -> None:
    if hidden_NxLxD.ndim != 3:
        raise ValueError(f"hidden states must be [N, L, D], got {hidden_NxLxD.shape}")
    if unembed_DxV.ndim != 2 or unembed_DxV.shape[0] != hidden_NxLxD.shape[2]:
        raise ValueError(f"unembedding must be [D, V] with D={hidden_NxLxD.shape[2]}, got {unembed_DxV.shape}")
    if targets_NxL.shape != hidden_NxLxD.shape[:2]:
        raise ValueError(f"targets {targets_NxL.shape} must be [N, L] = {hidden_NxLxD.shape[:2]}")


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def token_logprobs(
    hidden_NxLxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_NxL: jax.Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Per-token log-probabilities of `targets`, float32 [N, L] (for evaluation)."""
    _check_shapes(hidden_NxLxD, unembed_DxV, targets_NxL)
    length = targets_NxL.shape[1]
    chunk_size = balanced_chunk(length, chunk_size)
    hidden_ch = _to_chunks(hidden_NxLxD, chunk_size)
    targets_ch = _to_chunks(targets_NxL, chunk_size)
    body = jax.checkpoint(_chunk_token_logprobs)
    logps_ch = jax.lax.map(lambda xs: body(xs[0], unembed_DxV, xs[1]), (hidden_ch, targets_ch))
    return _from_chunks(logps_ch, length)


def _chunk_logprobs_and_greedy(hidden_NxCxD, unembed_DxV, targets_NxC) -> tuple[jax.Array, jax.Array]:
    logits_NxCxV = _chunk_logits(hidden_NxCxD, unembed_DxV)
    # The first of tied maxima, as torch.argmax takes it (lm-eval's `hf` backend's is-greedy).
    greedy_NxC = jnp.argmax(logits_NxCxV, axis=-1) == targets_NxC
    return _target_logprobs(logits_NxCxV, targets_NxC), greedy_NxC


def token_logprobs_and_greedy(
    hidden_NxLxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_NxL: jax.Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probabilities of `targets` (float32 [N, L]) and whether each target is the argmax (bool
    [N, L]): a continuation is what greedy decoding gives when all of its tokens are (lm-eval's loglikelihood)."""
    _check_shapes(hidden_NxLxD, unembed_DxV, targets_NxL)
    length = targets_NxL.shape[1]
    chunk_size = balanced_chunk(length, chunk_size)
    hidden_ch, targets_ch = _to_chunks(hidden_NxLxD, chunk_size), _to_chunks(targets_NxL, chunk_size)
    logps_ch, greedy_ch = jax.lax.map(
        lambda xs: _chunk_logprobs_and_greedy(xs[0], unembed_DxV, xs[1]), (hidden_ch, targets_ch)
    )
    return _from_chunks(logps_ch, length), _from_chunks(greedy_ch, length)


def _chunked_sums(
    hidden_NxLxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_NxL: jax.Array,
    labels_NxL: jax.Array,
    chunk_size: int,
    sum_chunk,
    init: jax.Array,
) -> jax.Array:
    """`init` plus `sum_chunk(logps_NxC, labels_NxC)` over the chunks of the sequence, in a scan whose
    body is rematerialised: one chunk's logits exist at a time, forward and backward. Chunk padding
    has label 0 (`_to_chunks`), which `sum_chunk` must count nowhere."""
    chunk_size = balanced_chunk(targets_NxL.shape[1], chunk_size)
    chunks = tuple(_to_chunks(x, chunk_size) for x in (hidden_NxLxD, targets_NxL, labels_NxL))

    @jax.checkpoint
    def chunk_sums(hidden_NxCxD, targets_NxC, labels_NxC):
        return sum_chunk(_chunk_token_logprobs(hidden_NxCxD, unembed_DxV, targets_NxC), labels_NxC)

    def step(total, xs):
        return total + chunk_sums(*xs), None

    total, _ = jax.lax.scan(step, init, chunks)
    return total


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def sequence_logprobs(
    hidden_NxLxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_NxL: jax.Array,
    mask_NxL: jax.Array,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Sum over masked positions of log p(target | hidden), float32 [N].

    Differentiable w.r.t. hidden states and unembedding with the same memory bound
    as the forward pass: the scan body is rematerialised, so the backward pass
    rebuilds one chunk's logits at a time.
    """
    _check_shapes(hidden_NxLxD, unembed_DxV, targets_NxL)
    if mask_NxL.shape != targets_NxL.shape:
        raise ValueError(f"mask {mask_NxL.shape} must match targets {targets_NxL.shape}")

    def masked_sum(logps_NxC, mask_NxC):
        return jnp.sum(jnp.where(mask_NxC, logps_NxC, 0.0), axis=1)

    init = jnp.zeros(targets_NxL.shape[0], jnp.float32)
    return _chunked_sums(hidden_NxLxD, unembed_DxV, targets_NxL, mask_NxL.astype(bool), chunk_size, masked_sum, init)


@functools.partial(jax.jit, static_argnames=("num_segments", "chunk_size"))
def segment_logprobs(
    hidden_NxMxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_NxM: jax.Array,
    segment_NxM: jax.Array,
    num_segments: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Per-segment sums of log p(target | hidden), float32 [N, num_segments]; segment -1 counts nowhere.

    `sequence_logprobs` with one sum per segment (the K responses of a packed list), with the
    same chunking and memory bound."""
    _check_shapes(hidden_NxMxD, unembed_DxV, targets_NxM)
    if segment_NxM.shape != targets_NxM.shape:
        raise ValueError(f"segments {segment_NxM.shape} must match targets {targets_NxM.shape}")

    def per_segment_sums(logps_NxC, label_NxC):  # label = segment + 1: 0 (padding, chunk padding) counts nowhere
        in_segment_NxCxS = label_NxC[..., None] == jnp.arange(1, num_segments + 1)
        return jnp.sum(jnp.where(in_segment_NxCxS, logps_NxC[..., None], 0.0), axis=1)

    init = jnp.zeros((targets_NxM.shape[0], num_segments), jnp.float32)
    return _chunked_sums(hidden_NxMxD, unembed_DxV, targets_NxM, segment_NxM + 1, chunk_size, per_segment_sums, init)


def naive_sequence_logprobs(
    hidden_NxLxD: jax.Array, unembed_DxV: jax.Array, targets_NxL: jax.Array, mask_NxL: jax.Array
) -> jax.Array:
    """Full-logits reference: materialises [N, L, V]. For tests and benchmarks only."""
    logits_NxLxV = jnp.einsum("nld,dv->nlv", hidden_NxLxD, unembed_DxV, preferred_element_type=jnp.float32)
    logps_NxLxV = jax.nn.log_softmax(logits_NxLxV, axis=-1)
    logps_NxL = jnp.take_along_axis(logps_NxLxV, targets_NxL[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask_NxL, logps_NxL, 0.0), axis=1)
