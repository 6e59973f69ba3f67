"""Weight-only int8: models that are only sampled (`model.sample_int8`, `pl_dpo.decode_layout`), and LoRA's frozen
weights while a phase trains (`model.lora.frozen_int8`, `pl_dpo.models.lora.quantize_frozen`).

A projection's kernel [*stack, in, out] becomes int8 values and one float32 scale per output column (symmetric,
absmax over `in` / 127): `x @ kernel ~= (x @ q) * scale`. The matmul reads int8 from memory (half of bf16,
which is what a bandwidth-bound decode step pays for) and XLA fuses the conversion into it. The embedding,
norms and output head stay in the compute dtype: the logits a sample is drawn from are as trained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    """q [*stack, in, out] int8 and scale [*stack, out] float32; `variable[...]` reads it whole."""

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, key):
        return self if key is Ellipsis else Int8Kernel(self.q[key], self.scale[key])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)


def scale_sharding(kernel_sharding: NamedSharding, ndim: int) -> NamedSharding:
    """Where the scales [*stack, out] of a kernel [*stack, in, out] placed by `kernel_sharding` go: its spec
    without the `in` entry."""
    spec = tuple(kernel_sharding.spec) + (None,) * (ndim - len(kernel_sharding.spec))
    return NamedSharding(kernel_sharding.mesh, P(*spec[:-2], spec[-1]))


def quantize_int8(kernel: jax.Array) -> Int8Kernel:
    """Symmetric per-output-column int8 of a kernel [*stack, in, out] (a zero column gets scale 1)."""
    absmax = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=-2)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(kernel.astype(jnp.float32) / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Kernel(q, scale)


def dequantize(kernel: Int8Kernel, dtype=jnp.float32) -> jax.Array:
    return (kernel.q.astype(jnp.float32) * kernel.scale[..., None, :]).astype(dtype)
