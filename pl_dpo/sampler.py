"""Jitted autoregressive sampling with a KV cache: one prefill of the left-padded prompts, then one
`lax.while_loop` over new tokens (no Python loop per token) that exits early once every row has stopped.

Shapes are bucketed: the prompt length is rounded up to a bucket (`SamplingConfig.prompt_buckets`) and the batch to a
power of two (and a multiple of `batch_multiple`), so a new batch of prompts reuses the compiled program.

Log-probs returned per new token:
  - `logprobs_BxT`: under the distribution actually sampled from (after temperature, top-k and top-p), i.e. the
    behaviour policy; for greedy decoding this is the plain model log-prob.
  - `model_logprobs_BxT`: under the plain model, log_softmax(logits) at temperature 1 with no truncation, i.e.
    what `pl_dpo.logprobs` computes on the same tokens (up to float error).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pl_dpo import sharding
from pl_dpo.data import prompt_batches, trim_at_eos
from pl_dpo.models.decoder import Decoder, positions_from_valid


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()  # EOS and any other stop tokens; the stop token itself is kept (and valid)
    pad_id: int = 0
    prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    batch_multiple: int = 1  # e.g. the number of data-parallel devices

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in np.atleast_1d(self.eos_ids)))
        object.__setattr__(self, "prompt_buckets", tuple(sorted(int(b) for b in self.prompt_buckets)))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature} must be > 0 (or set greedy=True)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k} must be >= 0")
        if self.batch_multiple < 1 or not self.prompt_buckets:
            raise ValueError("SamplingConfig.batch_multiple must be >= 1 and prompt_buckets non-empty")


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens_BxT: jax.Array  # new tokens; pad_id after the stop token
    valid_BxT: jax.Array  # True for generated tokens up to and including the stop token
    lengths_B: jax.Array  # number of valid new tokens
    logprobs_BxT: jax.Array  # under the sampling distribution (0 where invalid)
    model_logprobs_BxT: jax.Array  # under the plain model at temperature 1 (0 where invalid)


def bucket_shapes(batch: int, prompt_len: int, sampling: SamplingConfig) -> tuple[int, int]:
    """(padded batch, padded prompt length) actually compiled for."""
    b = 1 << max(0, (batch - 1).bit_length())
    b = -(-b // sampling.batch_multiple) * sampling.batch_multiple
    fits = [p for p in sampling.prompt_buckets if p >= prompt_len]
    largest = sampling.prompt_buckets[-1]
    p = fits[0] if fits else -(-prompt_len // largest) * largest
    return b, p


def _check_prompts(
    tokens: np.ndarray, valid: np.ndarray, vocab_size: int, max_positions: int, sampling: SamplingConfig
) -> None:
    if tokens.ndim != 2 or valid.shape != tokens.shape:
        raise ValueError(
            f"prompt_tokens_BxP {tokens.shape} and prompt_valid_BxP {valid.shape} must be equal 2-D shapes"
        )
    for b in range(tokens.shape[0]):
        row = valid[b]
        n = int(row.sum())
        if n == 0:
            raise ValueError(f"prompt row {b} is empty (no valid token)")
        if not row[-n:].all():
            raise ValueError(f"prompt row {b} is not left-padded: its valid tokens must be the last {n} positions")
        ids = tokens[b, -n:]
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt row {b} has a token id outside [0, {vocab_size})")
        if n + sampling.max_new_tokens > max_positions:
            raise ValueError(
                f"prompt row {b}: {n} prompt tokens + max_new_tokens={sampling.max_new_tokens} exceed the "
                f"model's context (max_position_embeddings={max_positions})"
            )


def _row_keys(rng, batch: int) -> jax.Array:
    """Accepts an int seed, one key (typed or raw uint32), or one key per row; returns typed keys [batch]."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng.astype(jnp.uint32))
    if rng.ndim == 0:
        return jax.random.split(rng, batch)
    if rng.shape != (batch,):
        raise ValueError(f"rng: expected one key or {batch} keys (one per row), got shape {rng.shape}")
    return rng


def sample_logits(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingConfig):
    """Returns (tokens_B, sampling-distribution log-probs_B, plain-model log-probs_B)."""
    model_logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    if sampling.greedy:
        tok_B = jnp.argmax(logits_BxV, axis=-1)
        lp_B = jnp.take_along_axis(model_logp_BxV, tok_B[:, None], axis=-1)[:, 0]
        return tok_B, lp_B, lp_B
    x_BxV = logits_BxV / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < x_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(x_BxV, sampling.top_k)[0][:, -1:]
        x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays iff the mass of the tokens
        # strictly more likely than it is < top_p (same rule as Hugging Face's TopPLogitsWarper).
        sorted_BxV = jnp.sort(x_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        above_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        threshold_Bx1 = jnp.min(jnp.where(above_BxV < sampling.top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        x_BxV = jnp.where(x_BxV < threshold_Bx1, -jnp.inf, x_BxV)
    tok_B = jax.vmap(jax.random.categorical)(keys_B, x_BxV)
    sample_logp_BxV = jax.nn.log_softmax(x_BxV, axis=-1)
    pick = lambda a: jnp.take_along_axis(a, tok_B[:, None], axis=-1)[:, 0]
    return tok_B, pick(sample_logp_BxV), pick(model_logp_BxV)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"))
def _generate_padded(graphdef, state, tokens_BxP, valid_BxP, keys_B, sampling: SamplingConfig):
    # Decoding re-reads every weight per token: cast once to the compute dtype, and split the stacked layer weights
    # into per-layer arrays once, instead of at every step.
    cdt = jnp.dtype(nnx.merge(graphdef, state).config.compute_dtype)
    state = jax.tree.map(lambda x: x.astype(cdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    model: Decoder = nnx.merge(graphdef, state)
    layer_params = model.layer_params()
    b, p = tokens_BxP.shape
    t = sampling.max_new_tokens
    cache = model.init_cache(b, p + t)
    hidden, cache = model.decode(tokens_BxP, positions_from_valid(valid_BxP), valid_BxP, cache, 0)
    logits_BxV = model.logits(hidden[:, -1:])[:, 0]
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)

    def cond(carry):
        step, done_B = carry[0], carry[4]
        return (step < t) & ~jnp.all(done_B)

    def body(carry):
        step, cache, logits_BxV, pos_B, done_B, toks, valid, lps, mlps = carry
        tok_B, lp_B, mlp_B = sample_logits(logits_BxV, jax.vmap(jax.random.fold_in, (0, None))(keys_B, step), sampling)
        live_B = ~done_B
        tok_B = jnp.where(live_B, tok_B.astype(jnp.int32), sampling.pad_id)
        toks = toks.at[:, step].set(tok_B)
        valid = valid.at[:, step].set(live_B)
        lps = lps.at[:, step].set(jnp.where(live_B, lp_B, 0.0))
        mlps = mlps.at[:, step].set(jnp.where(live_B, mlp_B, 0.0))
        done_B = done_B | jnp.isin(tok_B, eos)
        hidden, cache = model.decode(
            tok_B[:, None], pos_B[:, None], live_B[:, None], cache, p + step, layer_params=layer_params
        )
        return (step + 1, cache, model.logits(hidden)[:, 0], pos_B + 1, done_B, toks, valid, lps, mlps)

    init = (
        jnp.int32(0),
        cache,
        logits_BxV,
        valid_BxP.sum(axis=1).astype(jnp.int32),
        jnp.zeros((b,), bool),
        jnp.full((b, t), sampling.pad_id, jnp.int32),
        jnp.zeros((b, t), bool),
        jnp.zeros((b, t), jnp.float32),
        jnp.zeros((b, t), jnp.float32),
    )
    out = jax.lax.while_loop(cond, body, init)
    toks, valid, lps, mlps = out[5:]
    return toks, valid, valid.sum(axis=1).astype(jnp.int32), lps, mlps


def generate(model: Decoder, prompt_tokens_BxP, prompt_valid_BxP, rng, sampling: SamplingConfig) -> GenerationOutput:
    """Samples up to `max_new_tokens` per left-padded prompt. `rng`: int seed, a key, or one key per row."""
    tokens = np.asarray(prompt_tokens_BxP)
    valid = np.asarray(prompt_valid_BxP).astype(bool)
    cfg = model.config
    _check_prompts(tokens, valid, cfg.vocab_size, cfg.max_position_embeddings, sampling)
    batch, plen = tokens.shape
    keys_B = _row_keys(rng, batch)
    bb, pb = bucket_shapes(batch, plen, sampling)
    tokens_p = np.full((bb, pb), sampling.pad_id, np.int32)
    valid_p = np.zeros((bb, pb), bool)
    tokens_p[:batch, pb - plen :] = tokens
    valid_p[:batch, pb - plen :] = valid
    valid_p[batch:, -1] = True  # filler rows: one token each, so nothing special happens in them; dropped below
    keys_p = jnp.concatenate([keys_B, jax.random.split(jax.random.key(0), bb - batch)]) if bb > batch else keys_B
    graphdef, state = nnx.split(model)
    # With weights spread over several processes, every input is made a global replicated array (each process
    # holds the same prompts and keys); on one process this changes nothing.
    replicated = sharding.replicated_like(state)
    tokens_p, valid_p = (sharding.put_replicated(x, replicated) for x in (tokens_p, valid_p))
    if replicated is not None and not replicated.is_fully_addressable:
        keys_p = jax.random.wrap_key_data(sharding.put_replicated(np.asarray(jax.random.key_data(keys_p)), replicated))
    out = _generate_padded(graphdef, state, jnp.asarray(tokens_p), jnp.asarray(valid_p), keys_p, sampling)
    return GenerationOutput(*(x[:batch] for x in out))


def generate_responses(
    model: Decoder,
    arrays: dict[str, np.ndarray],
    sampling: SamplingConfig,
    rng: jax.Array,
    batch_size: int,
    eos_id: int,
    progress=None,
) -> list[list[int]]:
    """One response (token ids, EOS included when reached) per prompt of a dataset's `arrays`
    (`prompt_tokens_NxP` / `prompt_valid_NxP`), generated `batch_size` prompts at a time."""
    n = arrays["prompt_tokens_NxP"].shape[0]
    out: list[list[int] | None] = [None] * n
    for i, batch in enumerate(prompt_batches(arrays, batch_size=batch_size)):
        gen = generate(model, batch.prompt_tokens_BxP, batch.prompt_valid_BxP, jax.random.fold_in(rng, i), sampling)
        tokens, lengths = sharding.to_host(gen.tokens_BxT), sharding.to_host(gen.lengths_B)
        for row, ex in enumerate(batch.example_ids_B):
            if ex >= 0:
                out[ex] = trim_at_eos(tokens[row, : lengths[row]].tolist(), eos_id)
        if progress is not None:
            progress.update(int((batch.example_ids_B >= 0).sum()))
    return out  # type: ignore[return-value]
