"""TPU attention: Pallas splash attention (`attention_impl="splash"`), causal, GQA, padding as segment ids.

The kernel works on one sequence's [heads, T, head_dim] blocks; here it is vmapped over the batch
and, when a mesh is set (`jax.set_mesh`), wrapped in `shard_map` (Pallas TPU kernels cannot be
partitioned by the compiler): the batch is split over the mesh's ("data", "fsdp") axes and the
heads over "tensor". Padding is a second segment, so real tokens never see it; a padding query sees
padding keys only (its output is unused, and its row is never fully masked). The kernel does not
scale the queries, so they are scaled by head_dim**-0.5 first. T is padded up to the kernel's block
(128) and cut back.

On CPU the kernel runs in Pallas interpret mode (`interpret=True`), which the tests use to check it
against the einsum path; on TPU it compiles to Mosaic. The shared-prompt packed layout needs a
prefix-sharing mask that segment ids cannot express: packed batches use the einsum path's mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

BLOCK = 128
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class SelfAttention:
    """What splash needs instead of a dense [B, T, S] mask: which tokens are real, and the window."""

    valid_BxT: jax.Array
    window: int | None


jax.tree_util.register_dataclass(SelfAttention, data_fields=["valid_BxT"], meta_fields=["window"])


# Built in every trace, never cached across traces: the kernel holds its mask tables as arrays, which are
# tracers of the trace that made them (a kernel cached from a gradient's trace leaks into scoring's).
def _kernel(num_heads: int, seq_len: int, window: int | None, interpret: bool):
    if window is None:
        one = splash_mask.CausalMask((seq_len, seq_len))
    else:  # query i sees keys i - window + 1 .. i
        one = splash_mask.LocalMask((seq_len, seq_len), window_size=(window - 1, 0), offset=0)
    sizes = splash_kernel.BlockSizes(
        block_q=BLOCK,
        block_kv=BLOCK,
        block_kv_compute=BLOCK,
        block_q_dkv=BLOCK,
        block_kv_dkv=BLOCK,
        block_kv_dkv_compute=BLOCK,
        block_q_dq=BLOCK,
        block_kv_dq=BLOCK,
    )
    mask = splash_mask.MultiHeadMask([one] * num_heads)
    return splash_kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT, window: int | None, interpret: bool):
    kernel = _kernel(q_BxNxTxH.shape[1], q_BxNxTxH.shape[2], window, interpret)

    def one(q, k, v, seg):
        return kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=seg, kv=seg))

    return jax.vmap(one)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)


def splash_attention(
    q_BxTxNxH: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    valid_BxT: jax.Array,
    *,
    window: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal self-attention of T tokens with padding (`valid_BxT` False) masked out. Returns [B, T, N, H].

    `interpret`: None runs the kernel in interpret mode unless the mesh (or, without one, the default
    backend) is made of TPU chips."""
    mesh = jax.sharding.get_abstract_mesh()
    if interpret is None:  # the mesh's chips decide (a CPU host compiling for a TPU slice ahead of time)
        device = None if mesh.empty else getattr(mesh, "abstract_device", None)
        interpret = (device.platform if device is not None else jax.default_backend()) != "tpu"
    b, t, n, h = q_BxTxNxH.shape
    pad = -t % BLOCK
    segment_BxT = jnp.where(valid_BxT.astype(bool), 0, 1).astype(jnp.int32)
    if pad:  # padding slots: their own segment, after every real key
        widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (jnp.pad(x, widths) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
        segment_BxT = jnp.pad(segment_BxT, [(0, 0), (0, pad)], constant_values=1)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, heads, H] -> [B, heads, T, H]
    q = to_heads(q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype))
    k, v = to_heads(k_BxTxKxH), to_heads(v_BxTxKxH)
    local = functools.partial(_local, window=window, interpret=interpret)
    if not mesh.empty and set(BATCH_AXES + (HEAD_AXIS,)) <= set(mesh.axis_names):
        # Pallas kernels are opaque to the partitioner: each device runs the kernel on its own rows and heads.
        heads = HEAD_AXIS if n % mesh.shape[HEAD_AXIS] == 0 and k.shape[1] % mesh.shape[HEAD_AXIS] == 0 else None
        spec = P(BATCH_AXES, heads, None, None)
        local = jax.shard_map(
            local, mesh=mesh, in_specs=(spec, spec, spec, P(BATCH_AXES, None)), out_specs=spec, check_vma=False
        )
    out_BxNxTxH = local(q, k, v, segment_BxT)
    return jnp.swapaxes(out_BxNxTxH, 1, 2)[:, :t]
