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

from pl_dpo import decode_layout, sharding
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
    # Decode with the layers' projections as weight-only int8 (`models.quant`; model.sample_int8): half the
    # weight bytes of bf16, samples from an approximation of the model.
    int8: bool = False
    # Ids a sample may take: those below num_ids (the tokenizer's size; 0: every id of the model). A model whose
    # embedding has more rows than the tokenizer has ids (padded vocabularies) never samples one it cannot decode
    # or a smaller policy cannot embed.
    num_ids: int = 0

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
    _check_context(valid, max_positions, sampling)


def _check_context(valid: np.ndarray, max_positions: int, sampling: SamplingConfig) -> None:
    """Every row's prompt plus `max_new_tokens` within the model's context; the error names the first row that is
    not, and how many are not."""
    plen = np.asarray(valid).sum(-1)
    too_long = np.flatnonzero(plen + sampling.max_new_tokens > max_positions)
    if too_long.size:
        b = int(too_long[0])
        raise ValueError(
            f"prompt row {b}: {plen[b]} prompt tokens + max_new_tokens={sampling.max_new_tokens} exceed the "
            f"model's context (max_position_embeddings={max_positions}); {too_long.size} of {len(plen)} rows do"
        )


def _typed_key(rng) -> jax.Array:
    """An int seed, or keys typed or raw (uint32), as typed keys."""
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng.astype(jnp.uint32))
    return rng


def _row_keys(rng, batch: int) -> jax.Array:
    """Accepts an int seed, one key (typed or raw uint32), or one key per row; returns typed keys [batch]."""
    rng = _typed_key(rng)
    if rng.ndim == 0:
        return jax.random.split(rng, batch)
    if rng.shape != (batch,):
        raise ValueError(f"rng: expected one key or {batch} keys (one per row), got shape {rng.shape}")
    return rng


def sample_logits(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingConfig):
    """Returns (tokens_B, sampling-distribution log-probs_B, plain-model log-probs_B)."""
    if (
        0 < sampling.num_ids < logits_BxV.shape[-1]
    ):  # ids past the tokenizer's: never drawn (plain log-probs over the rest)
        logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < sampling.num_ids, logits_BxV, -jnp.inf)
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


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "layout"))
def _generate_padded(graphdef, rest, layers, tokens_BxP, valid_BxP, keys_B, sampling: SamplingConfig, layout):
    # `rest` and `layers` come from `decode_layout.decode_weights` (compute dtype, one array per layer); the model
    # is merged with empty stacked layers, which nothing reads: prefill and every step take `layers` directly.
    empty = jax.tree.map(lambda a: jnp.zeros((0, *a.shape), a.dtype), layers[0])
    model: Decoder = nnx.merge(graphdef, empty, rest)
    layer_params = [lp["layers"] for lp in layers]
    b, p = tokens_BxP.shape
    t = sampling.max_new_tokens
    rows = lambda x: jax.lax.with_sharding_constraint(x, layout.batch())
    cache_sh = layout.cache(model.config.num_kv_heads)

    def place(cache):
        k = tuple(jax.lax.with_sharding_constraint(c, cache_sh) for c in cache.k)
        v = tuple(jax.lax.with_sharding_constraint(c, cache_sh) for c in cache.v)
        return type(cache)(k, v, rows(cache.valid_BxS))

    cache = place(model.init_cache(b, p + t))
    hidden, cache = model.decode(
        tokens_BxP, positions_from_valid(valid_BxP), valid_BxP, cache, 0, layer_params=layer_params
    )
    cache = place(cache)
    logits_BxV = rows(model.logits(hidden[:, -1:])[:, 0])
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
        logits = rows(model.logits(hidden)[:, 0])
        return (step + 1, place(cache), logits, pos_B + 1, done_B, toks, valid, lps, mlps)

    init = (
        jnp.int32(0),
        cache,
        logits_BxV,
        rows(valid_BxP.sum(axis=1).astype(jnp.int32)),
        rows(jnp.zeros((b,), bool)),
        rows(jnp.full((b, t), sampling.pad_id, jnp.int32)),
        rows(jnp.zeros((b, t), bool)),
        rows(jnp.zeros((b, t), jnp.float32)),
        rows(jnp.zeros((b, t), jnp.float32)),
    )
    out = jax.lax.while_loop(cond, body, init)
    toks, valid, lps, mlps = out[5:]
    return toks, valid, valid.sum(axis=1).astype(jnp.int32), lps, mlps


def generate(
    model: Decoder,
    prompt_tokens_BxP,
    prompt_valid_BxP,
    rng,
    sampling: SamplingConfig,
    *,
    weights: decode_layout.DecodeWeights | None = None,
) -> GenerationOutput:
    """Samples up to `max_new_tokens` per left-padded prompt. `rng`: int seed, a key, or one key per row.

    The batch is split over the decode layout's batch groups (padded to a multiple of them); every process passes
    the same prompts and gets the whole result. `weights`: from `decode_layout.decode_weights`
    (reused across batches)."""
    tokens = np.asarray(prompt_tokens_BxP)
    valid = np.asarray(prompt_valid_BxP).astype(bool)
    cfg = model.config
    _check_prompts(tokens, valid, cfg.vocab_size, cfg.max_position_embeddings, sampling)
    batch, plen = tokens.shape
    keys_B = _row_keys(rng, batch)
    bb, pb = bucket_shapes(batch, plen, sampling)
    if weights is None:
        weights = decode_layout.decode_weights(model, bb, pb + sampling.max_new_tokens, int8=sampling.int8)
    layout = weights.layout
    bb = -(-bb // layout.groups) * layout.groups
    tokens_p = np.full((bb, pb), sampling.pad_id, np.int32)
    valid_p = np.zeros((bb, pb), bool)
    tokens_p[:batch, pb - plen :] = tokens
    valid_p[:batch, pb - plen :] = valid
    valid_p[batch:, -1] = True  # filler rows: one token each, so nothing special happens in them; dropped below
    keys_p = jnp.concatenate([keys_B, jax.random.split(jax.random.key(0), bb - batch)]) if bb > batch else keys_B
    rows = layout.batch()
    keys_p = jax.random.wrap_key_data(sharding.put_rows(np.asarray(jax.random.key_data(keys_p)), rows))
    out = _generate_padded(
        weights.graphdef,
        weights.rest,
        weights.layers,
        sharding.put_rows(tokens_p, rows),
        sharding.put_rows(valid_p, rows),
        keys_p,
        sampling,
        layout,
    )
    return GenerationOutput(*(x[:batch] if bb > batch else x for x in out))


def length_order(prompt_valid_NxP: np.ndarray) -> np.ndarray:
    """Prompt indices longest first (ties in dataset order): batches of similar lengths pad to their own
    bucket (`prompt_batches`), so most batches prefill and attend over far fewer pad positions; the longest
    batch comes first, so a bucket that does not fit fails at once, not at the end of a long pass."""
    return np.argsort(-np.asarray(prompt_valid_NxP).sum(-1), kind="stable")


def prompt_keys(rng, example_ids_B: np.ndarray) -> jax.Array:
    """One key per row from the prompt's own index: a prompt's sample does not depend on which batch or row it
    lands in (length grouping, batch size, process count). Filler rows (id -1) get the key of prompt 0."""
    key = _typed_key(rng)
    if key.ndim != 0:
        raise ValueError(f"prompt_keys takes one key, got keys of shape {key.shape}")
    ids = jnp.asarray(np.maximum(np.asarray(example_ids_B), 0), jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)


def generate_responses(
    model: Decoder,
    arrays: dict[str, np.ndarray],
    sampling: SamplingConfig,
    rng: jax.Array,
    batch_size: int,
    eos_id: int,
    progress=None,
    tp: int | None = None,
    group_by_length: bool = True,
) -> list[list[int]]:
    """One response (token ids, EOS included when reached) per prompt of a dataset's `arrays`
    (`prompt_tokens_NxP` / `prompt_valid_NxP`), generated `batch_size` prompts at a time.

    Prompts are grouped by length (`length_order`) and each gets its own key (`prompt_keys`). Every process
    passes the same prompts; each batch's rows are split over the decode layout's batch groups, so on several
    hosts each process samples only the rows its chips hold. Results stay where they were made until the end,
    when they are gathered once (no host round trip per batch: the next batch is dispatched while one runs).
    `tp`: the tensor-parallel group size (`decode_layout.decode_weights`; default: the rule of
    `decode_layout.decode_tp_split`).
    `group_by_length=False`: batches in dataset order (what length grouping is measured against)."""
    n, longest = arrays["prompt_tokens_NxP"].shape
    # Checked here, before batching reorders the prompts, so that the error names the prompt's own index.
    _check_context(arrays["prompt_valid_NxP"], model.config.max_position_embeddings, sampling)
    order_N = length_order(arrays["prompt_valid_NxP"]) if group_by_length else np.arange(n)
    grouped = {k: arrays[k][order_N] for k in ("prompt_tokens_NxP", "prompt_valid_NxP")}
    grouped["example_ids_N"] = order_N
    bb, pb = bucket_shapes(batch_size, longest, sampling)
    # Moved once, reused by every batch.
    weights = decode_layout.decode_weights(model, bb, pb + sampling.max_new_tokens, tp=tp, int8=sampling.int8)
    tokens, lengths, example_ids = [], [], []

    def done(i: int) -> None:  # batch i finished on this process's chips (no cross-host wait)
        lengths[i].block_until_ready()
        progress.update(int((example_ids[i] >= 0).sum()))

    for batch in prompt_batches(grouped, batch_size=batch_size):
        gen = generate(
            model,
            batch.prompt_tokens_BxP,
            batch.prompt_valid_BxP,
            prompt_keys(rng, batch.example_ids_B),
            sampling,
            weights=weights,
        )
        tokens.append(gen.tokens_BxT)
        lengths.append(gen.lengths_B)
        example_ids.append(batch.example_ids_B)
        if progress is not None and len(lengths) > 1:
            done(len(lengths) - 2)  # the previous batch: one batch stays queued behind the running one
    if progress is not None and lengths:
        done(len(lengths) - 1)
    # The one gather of the pass (every batch has the same [batch_size, max_new_tokens] shape).
    tokens_MxT = sharding.to_host(jnp.concatenate(tokens)) if tokens else np.zeros((0, 0), np.int32)
    lengths_M = sharding.to_host(jnp.concatenate(lengths)) if lengths else np.zeros((0,), np.int32)
    out: list[list[int] | None] = [None] * n
    for row, ex in enumerate(np.concatenate(example_ids) if example_ids else []):
        if ex >= 0:
            out[ex] = trim_at_eos(tokens_MxT[row, : lengths_M[row]].tolist(), eos_id)
    return out  # type: ignore[return-value]
