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

Cached decoding (`init_cache`, `decode`, `layer_params`; used by `pl_dpo.sampler`): prefill scans the layers like the
training forward (or loops over `layer_params` when given); single-token steps loop over layers in Python with one
[B, K, S, H] cache buffer per layer and per-layer weights (`decode_layout.decode_weights` makes them once, outside its
jitted program, so no step and no program holds a second stacked copy), so a step copies no cache or weight slices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pl_dpo.models import splash
from pl_dpo.models.config import DecoderConfig
from pl_dpo.models.layers import Block, Linear, RMSNorm, rope_cos_sin, rope_inv_freq


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values for S slots, one [B, K, S, H] buffer per layer; slot s of row b holds a real token iff
    valid_BxS[b, s]. Slots are the second-to-last axis, so attention reads each (row, kv-head) block contiguously."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid_BxS: jax.Array


class Embed(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.truncated_normal(0.02)
        self.embedding = nnx.Param(
            init(rngs.params(), (config.vocab_size, config.hidden_size), jnp.float32).astype(config.param_dtype)
        )

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


def _packed_attention_mask(segment_ids_BxT: jax.Array, positions_BxT: jax.Array, window: int | None) -> jax.Array:
    """Mask [B, T, T] of packed lists (`pl_dpo.data.packing`): causal by slot within a segment, and every response
    (segment k > 0) also sees the prompt (segment 0), never another response. The sliding window counts positions
    (they restart after the prompt), so a response sees the prompt tokens it would see in its own unpacked row."""
    slot_T = jnp.arange(segment_ids_BxT.shape[1])
    causal_TxT = slot_T[None, :] <= slot_T[:, None]
    q_seg, k_seg = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
    mask = causal_TxT[None] & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    if window is not None:
        mask &= (positions_BxT[:, :, None] - positions_BxT[:, None, :]) < window
    return mask | (slot_T[None, :] == slot_T[:, None])[None]


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The "dots" residuals moved to host memory after the forward and back for the backward pass: HBM of "full",
    # fewer FLOPs, paid in host transfers (BENCHMARKS.md, the planner's levers).
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class Decoder(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config, rngs=rngs)
        self.layers = Block((config.num_layers,), config, rngs=rngs)
        self.final_norm = RMSNorm((), config.hidden_size, config=config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear((), config.hidden_size, config.vocab_size, bias=False, config=config, rngs=rngs)
        )

    # --------------------------------------------------------------------------------------------- training forward
    def __call__(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        valid_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states [B, L, D]; causal + padding mask (left or right padding). With `segment_ids_BxL`
        the rows are packed lists (0 prompt, k response k, -1 padding; `valid_BxL` is then unused): each response
        attends to the prompt and to itself."""
        cfg = self.config
        x = self.embed(tokens_BxL, jnp.dtype(cfg.compute_dtype))
        cos, sin = rope_cos_sin(positions_BxL, rope_inv_freq(cfg))
        if segment_ids_BxL is None and cfg.attention_impl == "splash":
            mask = splash.SelfAttention(valid_BxL.astype(bool), cfg.sliding_window)
        elif segment_ids_BxL is None:
            mask = _attention_mask(valid_BxL.astype(bool), jnp.arange(tokens_BxL.shape[1]), cfg.sliding_window)
        else:
            mask = _packed_attention_mask(segment_ids_BxL, positions_BxL, cfg.sliding_window)
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
        return jnp.einsum(
            "bld,dv->blv",
            hidden_BxLxD.astype(dt),
            self.unembedding_DxV().astype(dt),
            preferred_element_type=jnp.float32,
        )

    # --------------------------------------------------------------------------------------------- cached decoding
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.config
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.compute_dtype)
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
        return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool))

    def layer_params(self, dtype=None) -> list[nnx.State]:
        """One state per layer, sliced off the stacked weights (optionally cast). A decode loop calls this once,
        outside the loop, so that no step slices the stacked weights again."""
        _, state = nnx.split(self.layers)
        cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
        return [jax.tree.map(lambda a, i=i: cast(a[i]), state) for i in range(self.config.num_layers)]

    def decode(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array,
        valid_BxT: jax.Array,
        cache: KVCache,
        write_index: jax.Array | int,
        *,
        layer_params: list[nnx.State] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens written to cache slots [write_index, write_index + T); they attend to every earlier valid
        slot. Prefill is T = prompt length at write_index 0 (the int); a decode step is T = 1. Returns
        (hidden_BxTxD, cache). `layer_params`: one state per layer (`layer_params()`, or the sampler's decode weights),
        reused across steps (else sliced here); prefill uses them too when given."""
        cfg = self.config
        t = tokens_BxT.shape[1]
        x = self.embed(tokens_BxT, jnp.dtype(cfg.compute_dtype))
        cos, sin = rope_cos_sin(positions_BxT, rope_inv_freq(cfg))
        valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxT.astype(bool), (0, write_index))
        graphdef = nnx.graphdef(self.layers)

        def write(cache_BxKxSxH, new_BxTxKxH):
            new = new_BxTxKxH.transpose(0, 2, 1, 3).astype(cache_BxKxSxH.dtype)
            return jax.lax.dynamic_update_slice(cache_BxKxSxH, new, (0, 0, write_index, 0))

        if isinstance(write_index, int) and write_index == 0:
            # Prefill into an empty cache: attend only to the T new keys (not all S slots), with the layers scanned
            # (compile time independent of depth); the per-layer keys/values come out as scan outputs.
            mask = _attention_mask(valid_BxS[:, :t], jnp.arange(t), cfg.sliding_window)
            if layer_params is not None:
                # Per-layer weights given (the sampler's decode layout holds no stacked copy): a Python loop.
                ks, vs = list(cache.k), list(cache.v)
                for i, layer_state in enumerate(layer_params):
                    block = nnx.merge(graphdef, layer_state)
                    q, k, v = block.qkv(x, cos, sin)
                    ks[i], vs[i] = write(ks[i], k), write(vs[i], v)
                    x = block.finish(x, q, k, v, mask)
                return self.final_norm(x), KVCache(tuple(ks), tuple(vs), valid_BxS)

            def body(x_BxTxD, layer_state):
                block = nnx.merge(graphdef, layer_state)
                q, k, v = block.qkv(x_BxTxD, cos, sin)
                return block.finish(x_BxTxD, q, k, v, mask), (k, v)

            x, (k_LxBxTxKxH, v_LxBxTxKxH) = jax.lax.scan(body, x, nnx.state(self.layers))
            ks = tuple(write(c, k_LxBxTxKxH[i]) for i, c in enumerate(cache.k))
            vs = tuple(write(c, v_LxBxTxKxH[i]) for i, c in enumerate(cache.v))
            return self.final_norm(x), KVCache(ks, vs, valid_BxS)

        # Decode steps: a Python loop over layers with one cache buffer per layer. Each layer's new slots are written in
        # place and its attention reads that buffer directly: with a stacked [L, ...] cache or stacked weights every
        # step would copy a layer slice of both (XLA materialises dynamic slices), doubling a bandwidth-bound step.
        mask = _attention_mask(valid_BxS, write_index + jnp.arange(t), cfg.sliding_window)
        layer_params = self.layer_params() if layer_params is None else layer_params
        ks, vs = list(cache.k), list(cache.v)
        for i, layer_state in enumerate(layer_params):
            block = nnx.merge(graphdef, layer_state)
            q, k, v = block.qkv(x, cos, sin)
            ks[i], vs[i] = write(ks[i], k), write(vs[i], v)
            x = block.finish(x, q, ks[i], vs[i], mask, kv_layout="BKSH")
        return self.final_norm(x), KVCache(tuple(ks), tuple(vs), valid_BxS)


def create_model(config: DecoderConfig, *, seed: int) -> Decoder:
    """Random init as Hugging Face does it (truncated normal, std 0.02; norms 1; biases 0)."""
    return Decoder(config, rngs=nnx.Rngs(params=seed))


def positions_from_valid(valid_BxL: jax.Array) -> jax.Array:
    """Positions 0, 1, ... counted over valid tokens only (left or right padding); padding gets 0."""
    valid = valid_BxL.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0) * valid
