"""Ahead-of-time compilation for a TPU slice with the real TPU compiler (libtpu, the `tpu` extra), on CPU.

`jax.experimental.topologies` describes a v5e:2x2 slice (4 abstract "TPU v5 lite" chips); programs are
lowered from abstract shapes with their shardings and compiled by libtpu: what compiles here compiles on
the slice, and `memory_analysis()` gives its per-chip figures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

pytest.importorskip("libtpu", reason="the TPU compiler comes with the `tpu` extra: pip install -e '.[tpu]'")

from jax.experimental import topologies  # noqa: E402

from configs import common  # noqa: E402
from pl_dpo import (  # noqa: E402
    config_lib,  # noqa: E402
    losses,
    sharding,
)
from pl_dpo.data import RankedBatch  # noqa: E402
from pl_dpo.models import create_model, preset_config  # noqa: E402
from pl_dpo.models.splash import splash_attention  # noqa: E402
from pl_dpo.training import train  # noqa: E402


@pytest.fixture(scope="module")
def v5e_mesh():
    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5e:2x2",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    assert [d.device_kind for d in topo.devices] == ["TPU v5 lite"] * 4
    return sharding.make_mesh(1, -1, 1, devices=topo.devices)


def abstract(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def test_splash_attention_forward_and_backward_compile_for_v5e(v5e_mesh):
    sh = sharding.batch_sharding(v5e_mesh)
    b, t, n, kv, h = 8, 512, 8, 4, 128
    args = (
        abstract((b, t, n, h), jnp.bfloat16, sh),
        abstract((b, t, kv, h), jnp.bfloat16, sh),
        abstract((b, t, kv, h), jnp.bfloat16, sh),
        abstract((b, t), jnp.bool_, sh),
    )

    def loss(q, k, v, valid):
        return jnp.sum(splash_attention(q, k, v, valid, window=256, interpret=False).astype(jnp.float32))

    with jax.set_mesh(v5e_mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args)
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not a fallback
    per_chip = sum(x.size * x.dtype.itemsize for x in args) / len(v5e_mesh.devices.flat)
    # Each chip holds its quarter of the batch (the compiler pads the bool mask a little).
    assert lowered.compile().memory_analysis().argument_size_in_bytes == pytest.approx(per_chip, rel=0.01)


def test_train_step_with_splash_attention_compiles_for_v5e(v5e_mesh):
    cfg = preset_config("tiny-llama", vocab_size=512, attention_impl="splash", compute_dtype="bfloat16", remat="full")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(cfg, seed=0)))
    rules = sharding.DEFAULT_DECODER_RULES
    param_sh = sharding.logical_to_shardings(params, v5e_mesh, rules)
    tx = config_lib.optimizer(common.optimizer(1e-5, name="rmsprop")).build(10)
    opt = jax.eval_shape(tx.init, params)
    opt_sh = sharding.logical_to_shardings(opt, v5e_mesh, rules, rank_mismatch="replicate")
    objective = train.pl_dpo_objective(losses.LossConfig(T=0.1), chunk_size=128)
    bsh = sharding.batch_sharding(v5e_mesh)
    step = train.make_train_step(graphdef, objective, tx, train.TrainState(param_sh, opt_sh), bsh)
    b, k, length = 8, 2, 256
    batch = RankedBatch(
        tokens_BxKxL=abstract((b, k, length), jnp.int32, bsh),
        loss_mask_BxKxL=abstract((b, k, length), jnp.bool_, bsh),
        attn_valid_BxKxL=abstract((b, k, length), jnp.bool_, bsh),
        positions_BxKxL=abstract((b, k, length), jnp.int32, bsh),
        valid_BxK=abstract((b, k), jnp.bool_, bsh),
        example_ids_B=abstract((b,), jnp.int32, bsh),
        ref_logps_BxK=abstract((b, k), jnp.float32, bsh),
    )
    with_sh = lambda tree, sh: jax.tree.map(lambda a, s: abstract(a.shape, a.dtype, s), tree, sh)  # noqa: E731
    with jax.set_mesh(v5e_mesh):
        lowered = step.lower(with_sh(params, param_sh), with_sh(opt, opt_sh), batch)
    assert "tpu_custom_call" in lowered.as_text()
    memory = lowered.compile().memory_analysis()
    assert 0 < memory.argument_size_in_bytes < 4 * 2**20 and memory.temp_size_in_bytes > 0
