"""The decoder-only transformer (Flax NNX) and its KV cache.

Layers are stacked: every per-layer weight has a leading layer axis and the forward pass is one `lax.scan` over it
(compile time independent of depth). Parameter paths (`nnx.state(model)`, '/'-joined) for partition rules:

    embed/embedding                      [V, D]
    layers/input_norm/scale              [L, D]
    layers/attn/{q,k,v,o}_proj/kernel    [L, D_in, D_out]     (+ .../bias [L, D_out] with attention_bias)
    layers/post_attn_norm/scale          [L, D]
    layers/mlp/{gate,up,down}_proj/kernel[L, D_in, D_out]
    final_norm/scale                     [D]
    lm_head/kernel                       [D, V]   (absent with tie_word_embeddings)

Kernels are (in, out), i.e. the transpose of torch's Linear.weight. `__call__` returns final hidden states (after the
final norm) in the compute dtype; `logits` maps them to float32 logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pl_dpo.models.config import DecoderConfig
from pl_dpo.models.layers import Block, Linear, RMSNorm, rope_cos_sin, rope_inv_freq


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer for S slots; slot s of row b holds a real token iff valid_BxS[b, s]."""

  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  valid_BxS: jax.Array


class Embed(nnx.Module):
  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(0.02)
    self.embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), jnp.float32)
                               .astype(config.param_dtype))

  def __call__(self, tokens_BxT: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(dtype)


def _attention_mask(valid_keys_BxS: jax.Array, q_slot_T: jax.Array, window: int | None) -> jax.Array:
  """Causal (by slot index) + padding (+ sliding window) mask [B, T, S]. A query always sees its own slot, so a
  padding query never has an all-masked row (its output is unused but stays finite)."""
  k_slot_S = jnp.arange(valid_keys_BxS.shape[1])
  causal_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
  if window is not None:
    causal_TxS &= (q_slot_T[:, None] - k_slot_S[None, :]) < window
  return (valid_keys_BxS[:, None, :] & causal_TxS[None]) | (k_slot_S[None, :] == q_slot_T[:, None])[None]


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Decoder(nnx.Module):
  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config, rngs=rngs)
    self.layers = Block((config.num_layers,), config, rngs=rngs)
    self.final_norm = RMSNorm((), config.hidden_size, config=config)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear((), config.hidden_size, config.vocab_size, bias=False, config=config, rngs=rngs))

  # --------------------------------------------------------------------------------------------- training forward
  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Final hidden states [B, L, D]; causal + padding mask (left or right padding)."""
    cfg = self.config
    x = self.embed(tokens_BxL, jnp.dtype(cfg.compute_dtype))
    cos, sin = rope_cos_sin(positions_BxL, rope_inv_freq(cfg))
    mask = _attention_mask(valid_BxL.astype(bool), jnp.arange(tokens_BxL.shape[1]), cfg.sliding_window)
    graphdef, state = nnx.split(self.layers)

    def body(x_BxLxD, layer_state):
      return nnx.merge(graphdef, layer_state)(x_BxLxD, cos, sin, mask), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, state)
    return self.final_norm(x)

  # ------------------------------------------------------------------------------------------ output embeddings
  def unembedding_DxV(self) -> jax.Array:
    """The output projection [D, V] (embedding.T when tied), in the parameter dtype."""
    if self.lm_head is None:
      return self.embed.embedding[...].T
    return self.lm_head.kernel[...]

  def logits(self, hidden_BxLxD: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.config.compute_dtype)
    return jnp.einsum("bld,dv->blv", hidden_BxLxD.astype(dt), self.unembedding_DxV().astype(dt),
                      preferred_element_type=jnp.float32)

  # --------------------------------------------------------------------------------------------- cached decoding
  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    cfg = self.config
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.compute_dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), bool))

  def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, valid_BxT: jax.Array, cache: KVCache,
             write_index: jax.Array | int) -> tuple[jax.Array, KVCache]:
    """Runs T new tokens written to cache slots [write_index, write_index + T); they attend to every earlier valid
    slot. Prefill is T = prompt length at write_index 0; a decode step is T = 1. Returns (hidden_BxTxD, cache)."""
    cfg = self.config
    t = tokens_BxT.shape[1]
    x = self.embed(tokens_BxT, jnp.dtype(cfg.compute_dtype))
    cos, sin = rope_cos_sin(positions_BxT, rope_inv_freq(cfg))
    valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxT.astype(bool), (0, write_index))
    # A prefill into an empty cache (write_index the constant 0) only needs to attend to its own T keys, not to
    # all S slots: this halves the prefill's score matrices when S = prompt + new tokens.
    prefill = isinstance(write_index, int) and write_index == 0
    mask = _attention_mask(valid_BxS[:, :t] if prefill else valid_BxS, write_index + jnp.arange(t),
                           cfg.sliding_window)
    graphdef, state = nnx.split(self.layers)

    # The whole cache rides in the scan carry and only the new slots are written (in place under XLA), rather than
    # emitting per-layer caches as scan outputs, which would copy the full cache at every decode step.
    def body(carry, xs):
      x_BxTxD, k_cache, v_cache = carry
      layer_state, layer = xs
      block = nnx.merge(graphdef, layer_state)
      q, k, v = block.qkv(x_BxTxD, cos, sin)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (layer, 0, write_index, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (layer, 0, write_index, 0, 0))
      keys, values = (k, v) if prefill else (k_cache[layer], v_cache[layer])
      x_BxTxD = block.finish(x_BxTxD, q, keys, values, mask)
      return (x_BxTxD, k_cache, v_cache), None

    (x, k_cache, v_cache), _ = jax.lax.scan(
        body, (x, cache.k_LxBxSxKxH, cache.v_LxBxSxKxH), (state, jnp.arange(cfg.num_layers)))
    return self.final_norm(x), KVCache(k_cache, v_cache, valid_BxS)


def create_model(config: DecoderConfig, *, seed: int) -> Decoder:
  """Random init as Hugging Face does it (truncated normal, std 0.02; norms 1; biases 0)."""
  return Decoder(config, rngs=nnx.Rngs(params=seed))


def positions_from_valid(valid_BxL: jax.Array) -> jax.Array:
  """Positions 0, 1, ... counted over valid tokens only (left or right padding); padding gets 0."""
  valid = valid_BxL.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0) * valid
