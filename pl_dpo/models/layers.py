"""Building blocks of the decoder: RMSNorm, RoPE, (stacked) linear layers, GQA attention, SwiGLU MLP, block.

Every parameter may carry leading "stack" axes (the layer axis of `Decoder.layers`); the forward code only uses the
trailing axes, so a module merged from one layer's slice of the stacked state runs unchanged under `lax.scan`.
Numerics follow Hugging Face's PyTorch Llama: norms and softmax in float32, matmuls in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pl_dpo.models import splash
from pl_dpo.models.config import DecoderConfig
from pl_dpo.models.quant import Int8Kernel

_MASKED = -1e30  # finite, so a fully masked row gives a uniform softmax, never NaN


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is (*stack, in, out) -- transposed relative to torch's (out, in)."""

    def __init__(
        self, stack: tuple[int, ...], d_in: int, d_out: int, *, bias: bool, config: DecoderConfig, rngs: nnx.Rngs
    ):
        pdt = _dtype(config.param_dtype)
        init = jax.nn.initializers.truncated_normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (*stack, d_in, d_out), jnp.float32).astype(pdt))
        self.bias = nnx.Param(jnp.zeros((*stack, d_out), pdt)) if bias else None
        self.compute_dtype = _dtype(config.compute_dtype)
        # A low-rank adapter (`pl_dpo.models.lora`): lora_a [*stack, in, r], lora_b [*stack, r, out], while a
        # phase trains with LoRA; merged into the kernel at its end.
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.compute_dtype)
        kernel = self.kernel[...]
        if isinstance(kernel, Int8Kernel):  # weight-only int8 (`models.quant`): a sampler's, or LoRA's frozen_int8
            y = jnp.einsum("...i,io->...o", x, kernel.q.astype(self.compute_dtype))
            y = y * kernel.scale.astype(self.compute_dtype)
        else:
            y = jnp.einsum("...i,io->...o", x, kernel.astype(self.compute_dtype))
        if self.lora_a is not None:
            x_r = jnp.einsum("...i,ir->...r", x, self.lora_a[...].astype(self.compute_dtype))
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", x_r, self.lora_b[...].astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, stack: tuple[int, ...], dim: int, *, config: DecoderConfig):
        self.scale = nnx.Param(jnp.ones((*stack, dim), _dtype(config.param_dtype)))
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # As HF: normalise in float32, cast back to the activation dtype, then multiply by the weight.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


# ------------------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float32), including "linear" and "llama3" scaling, as transformers computes."""
    dim = config.head_dim
    inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        factor = np.float32(scaling["factor"])
        low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
        old_len = np.float32(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * np.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype), sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
    return x_BxTxNxH * cos + rotated * sin


# -------------------------------------------------------------------------------------------------- attention
def attention(
    q_BxTxNxH: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_BxTxS: jax.Array | splash.SelfAttention,
    impl: str,
    kv_layout: str = "BSKH",
) -> jax.Array:
    """Grouped-query attention with a boolean mask (True = attend). Returns [B, T, N, H].

    k/v are [B, S, K, H] ("BSKH", fresh keys) or [B, K, S, H] ("BKSH", the KV cache's layout: per (row, head) the
    slots are contiguous, so decode steps read the cache without transposing it)."""
    if isinstance(mask_BxTxS, splash.SelfAttention):  # attention_impl="splash": the TPU kernel, no dense mask
        return splash.splash_attention(q_BxTxNxH, k, v, mask_BxTxS.valid_BxT, window=mask_BxTxS.window)
    b, t, n, h = q_BxTxNxH.shape
    kh = k.shape[2] if kv_layout == "BSKH" else k.shape[1]
    scale = h**-0.5
    if impl in ("xla", "cudnn") and kv_layout == "BSKH":
        # cuDNN takes a general mask as a bias; it wants bf16/fp16 q/k/v (compute_dtype) and a GPU.
        return jax.nn.dot_product_attention(q_BxTxNxH, k, v, mask=mask_BxTxS[:, None], scale=scale, implementation=impl)
    # Cached decoding always takes this path: one query per row is bandwidth bound and needs no fused kernel.
    kv = "bskh" if kv_layout == "BSKH" else "bksh"
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum(f"btkgh,{kv}->bkgts", q_BxTxKxGxH, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, stack: tuple[int, ...], config: DecoderConfig, *, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type == "llama"  # qwen2: no bias on o_proj
        self.q_proj = Linear(stack, d, config.num_heads * hd, bias=qkv_bias, config=config, rngs=rngs)
        self.k_proj = Linear(stack, d, config.num_kv_heads * hd, bias=qkv_bias, config=config, rngs=rngs)
        self.v_proj = Linear(stack, d, config.num_kv_heads * hd, bias=qkv_bias, config=config, rngs=rngs)
        self.o_proj = Linear(stack, config.num_heads * hd, d, bias=o_bias, config=config, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.impl = config.attention_impl

    def qkv(self, x_BxTxD, cos, sin):
        b, t, _ = x_BxTxD.shape
        q = apply_rope(self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def out(self, q_BxTxNxH, keys, values, mask_BxTxS, kv_layout: str = "BSKH"):
        b, t = q_BxTxNxH.shape[:2]
        o = attention(
            q_BxTxNxH, keys.astype(q_BxTxNxH.dtype), values.astype(q_BxTxNxH.dtype), mask_BxTxS, self.impl, kv_layout
        )
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, stack: tuple[int, ...], config: DecoderConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(stack, d, f, bias=False, config=config, rngs=rngs)
        self.up_proj = Linear(stack, d, f, bias=False, config=config, rngs=rngs)
        self.down_proj = Linear(stack, f, d, bias=False, config=config, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class Block(nnx.Module):
    """Pre-norm transformer block. Created with stack=(num_layers,) it holds all layers' weights stacked."""

    def __init__(self, stack: tuple[int, ...], config: DecoderConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(stack, config.hidden_size, config=config)
        self.attn = Attention(stack, config, rngs=rngs)
        self.post_attn_norm = RMSNorm(stack, config.hidden_size, config=config)
        self.mlp = MLP(stack, config, rngs=rngs)

    def qkv(self, x_BxTxD, cos, sin):
        """Queries, keys and values of the new tokens (RoPE applied)."""
        return self.attn.qkv(self.input_norm(x_BxTxD), cos, sin)

    def finish(self, x_BxTxD, q_BxTxNxH, keys, values, mask_BxTxS, kv_layout: str = "BSKH"):
        """Attention over the given keys/values (the new ones, or the cache holding them) + residual + MLP."""
        x_BxTxD = x_BxTxD + self.attn.out(q_BxTxNxH, keys, values, mask_BxTxS, kv_layout)
        return x_BxTxD + self.mlp(self.post_attn_norm(x_BxTxD))

    def __call__(self, x_BxTxD, cos, sin, mask_BxTxS):
        q, k, v = self.qkv(x_BxTxD, cos, sin)
        return self.finish(x_BxTxD, q, k, v, mask_BxTxS)
