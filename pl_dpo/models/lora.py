"""Low-rank adapters (LoRA) on the decoder's projections, written for its stacked, scanned layers.

A targeted `Linear` gains `lora_a` [*stack, in, r] and `lora_b` [*stack, r, out] (`nnx.LoRAParam`) and computes

    y = x @ kernel + scale * (x @ lora_a) @ lora_b,      scale = alpha / r   (rsLoRA: alpha / sqrt(r))

The adapters carry the same leading layer axis as the kernel, so the scan over layers slices them with it and the
backward pass never forms a full-size weight gradient. `lora_b` starts at zero (PEFT's init; `lora_a` is
Kaiming-uniform like PEFT's), so a fresh adapter leaves the model's output bit for bit as it was.

Why not qwix (tunix's LoRA library): its provider intercepts a module's matmul at trace time and creates the
adapter there with that call's shapes. Inside `Decoder.__call__`'s `lax.scan` the call sees one layer's
[in, out] slice, so an adapter would be per-call, unstacked state created inside a traced loop; the decoder's
layer axis, partition rules and checkpoints need the adapter stacked like its kernel.

A training phase (`pl_dpo.training.phase`) adds adapters to its start policy, trains only them (`nnx.LoRAParam`
is the trainable filter, the rest stays frozen in its dtype), and at the end `merge` folds them into the kernels:
the merged model is the phase's policy, and the next phase starts from fresh adapters.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from pl_dpo.models.layers import Linear
from pl_dpo.models.quant import Int8Kernel, quantize_int8, scale_sharding


class LoraError(ValueError):
    """A LoRA setting or adapter file that does not fit the model; names the field or tensor."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`config.model.lora` when enabled (configs/common.py:lora() holds the defaults)."""

    rank: int
    alpha: float
    rslora: bool  # scale alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank
    targets: str  # a regex searched in each projection's module path, e.g. "layers/attn/q_proj"
    # QLoRA-style: the layers' frozen projection kernels as int8 while the phase trains (`quantize_frozen`); the
    # phase's policy merges the adapters into the full-precision weights (`SelfPlay._merged`).
    frozen_int8: bool = False

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise LoraError(f"rank={self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            raise LoraError(f"alpha={self.alpha!r} must be > 0")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise LoraError(f"targets={self.targets!r} is not a regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def projections(model: nnx.Module) -> dict[str, Linear]:
    """Every `Linear` of the model by its '/'-joined module path ("layers/attn/q_proj", "lm_head")."""
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}


def targets(model: nnx.Module, lora: LoraConfig) -> dict[str, Linear]:
    """The projections `lora.targets` selects; refuses a pattern that selects none, listing the module paths."""
    found = {path: m for path, m in projections(model).items() if re.search(lora.targets, path)}
    if not found:
        names = ", ".join(sorted(projections(model)))
        raise LoraError(f"targets={lora.targets!r} matches no projection of the model; its projections: {names}")
    return found


def add_adapters(model: nnx.Module, lora: LoraConfig, key: jax.Array, shardings=None) -> None:
    """Adds fresh adapters (A Kaiming-uniform, B zero; float32) to the targeted projections, in place.

    `shardings(path, shape) -> Sharding | None` places each adapter (the run passes its partition rules)."""
    for index, (path, linear) in enumerate(sorted(targets(model, lora).items())):
        *stack, d_in, d_out = linear.kernel.shape
        # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, index), (*stack, d_in, lora.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((*stack, lora.rank, d_out), jnp.float32)
        set_adapter(linear, a, b, lora.scale, path, shardings)


def set_adapter(linear: Linear, a, b, scale: float, path: str, shardings=None) -> None:
    """Puts adapter `a` [*stack, in, r], `b` [*stack, r, out] on `linear` (placed by `shardings` when given)."""
    for name, value in (("lora_a", a), ("lora_b", b)):
        sharding = None if shardings is None else shardings(f"{path}/{name}", tuple(value.shape))
        setattr(
            linear, name, nnx.LoRAParam(jnp.asarray(value) if sharding is None else jax.device_put(value, sharding))
        )
    linear.lora_scale = float(scale)


def quantize_frozen(model: nnx.Module) -> None:
    """The layers' projection kernels as weight-only int8 (`models.quant`), in place, each where it lies: the
    int8 values keep the kernel's sharding, the per-column scales its `out` entry. The lm_head stays."""
    for path, linear in projections(model).items():
        kernel = linear.kernel[...]
        if not path.startswith("layers/") or isinstance(kernel, Int8Kernel):
            continue
        sharding = (
            kernel.sharding if isinstance(kernel, jax.Array) and not isinstance(kernel, jax.core.Tracer) else None
        )
        out = (
            Int8Kernel(sharding, scale_sharding(sharding, kernel.ndim)) if isinstance(sharding, NamedSharding) else None
        )
        linear.kernel.set_value(jax.jit(quantize_int8, out_shardings=out)(kernel))


def has_adapters(model: nnx.Module) -> bool:
    return any(m.lora_a is not None for m in projections(model).values())


def adapters(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array, float]]:
    """Module path -> (lora_a, lora_b, scale) of every adapted projection (what `put_on` puts on another model)."""
    return {
        p: (m.lora_a[...], m.lora_b[...], m.lora_scale) for p, m in projections(model).items() if m.lora_a is not None
    }


def put_on(model: nnx.Module, adapters_by_path: dict[str, tuple[jax.Array, jax.Array, float]]) -> nnx.Module:
    """Puts another model's `adapters` on the same projections of `model` (in place; they keep their placement)."""
    linears = projections(model)
    for path, (a, b, scale) in adapters_by_path.items():
        set_adapter(linears[path], a, b, scale, path)
    return model


def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    def fold(kernel, a, b):
        update = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)

    return jax.jit(fold, out_shardings=getattr(kernel, "sharding", None))(kernel, a, b)


def merge(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (kernel + scale * A @ B, in float32, cast back to the kernel's dtype) and
    removes the adapters, in place; returns the model, whose kernels keep their shardings."""
    for linear in projections(model).values():
        if linear.lora_a is None:
            continue
        linear.kernel.set_value(
            _merged_kernel(linear.kernel[...], linear.lora_a[...], linear.lora_b[...], linear.lora_scale)
        )
        linear.lora_a = linear.lora_b = None
        linear.lora_scale = 0.0
    return model
