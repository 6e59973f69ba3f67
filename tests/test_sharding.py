"""Mesh, partition rules, sharded creation, and 8-device vs 1-device step parity."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from sharded_state import create_sharded, create_sharded_optimizer

from pl_dpo import sharding as shd

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

V, D, F, H, L = 64, 16, 32, 2, 8


# ----------------------------------------------------------------------------- a tiny decoder
# Parameter paths follow the project's Decoder: embed/embedding, layers/i/attn/q_proj/kernel,
# layers/i/mlp/down_proj/kernel, final_norm/scale, lm_head/kernel.


class Attn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(D, D, rngs=rngs)
        # No key bias: its true gradient is exactly 0 (softmax is shift invariant), so
        # Adam would turn reduction-order noise into full-size updates.
        self.k_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, rngs=rngs)
        self.o_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, x_BxLxD):
        b, l, _ = x_BxLxD.shape
        split = lambda t: t.reshape(b, l, H, D // H)
        q, k, v = split(self.q_proj(x_BxLxD)), split(self.k_proj(x_BxLxD)), split(self.v_proj(x_BxLxD))
        s_BxHxLxL = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
        causal = jnp.tril(jnp.ones((l, l), bool))
        s_BxHxLxL = jnp.where(causal, s_BxHxLxL, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s_BxHxLxL, -1), v)
        return self.o_proj(o.reshape(b, l, D))


class Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(F, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(D, rngs=rngs)
        self.attn = Attn(rngs)
        self.post_attention_layernorm = nnx.RMSNorm(D, rngs=rngs)
        self.mlp = Mlp(rngs)

    def __call__(self, x):
        x = x + self.attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, n_layers: int = 2):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([Layer(rngs) for _ in range(n_layers)])
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens_BxL):
        x = self.embed(tokens_BxL)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


def nll(model: TinyDecoder, tokens_BxL):
    logits_BxLxV = model(tokens_BxL[:, :-1])
    logp = jax.nn.log_softmax(logits_BxLxV, -1)
    return -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], -1).mean()


# ----------------------------------------------------------------------------- mesh


def test_make_mesh_sizes():
    m = shd.make_mesh(2, 2, 2)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(shd.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(shd.make_mesh(data=2, fsdp=1, tensor=-1).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(shd.make_mesh(devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(data=3, fsdp=-1), "data=3 fsdp=-1 tensor=1 with 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), "multiply to 4, not to the device count 8"),
        (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
        (dict(data=0), "'data' size must be"),
        (dict(data=16, fsdp=1), "multiply to 16"),
    ],
)
def test_make_mesh_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        shd.make_mesh(**kwargs)


# ----------------------------------------------------------------------------- rules


def test_rule_matching_first_wins_and_default():
    rules = [(r"q_proj/kernel$", P("fsdp", "tensor")), (r"kernel$", P("tensor")), (r"bias", P())]
    assert shd.match_rule("layers/0/attn/q_proj/kernel", rules) == P("fsdp", "tensor")
    assert shd.match_rule("layers/0/mlp/down_proj/kernel", rules) == P("tensor")
    assert shd.match_rule("final_norm/scale", rules) is None
    mesh = shd.make_mesh(2, 2, 2)
    assert shd.spec_for("final_norm/scale", (16,), mesh, rules) == P()
    with pytest.raises(ValueError, match="'final_norm/scale'.*matches no partition rule"):
        shd.spec_for("final_norm/scale", (16,), mesh, rules, error_on_unmatched=True)


def test_stacked_layers_non_divisible_and_rank_errors(caplog):
    mesh = shd.make_mesh(2, 2, 2)
    rules = shd.DEFAULT_DECODER_RULES
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    tree = {
        "layers": {"attn": {"q_proj": {"kernel": sds(4, 16, 32)}, "o_proj": {"kernel": sds(4, 32, 16)}}},
        "embed": {"embedding": sds(15, 16)},  # vocab 15 is not divisible by tensor=2
        "lm_head": {"kernel": sds(16, 15)},
    }
    with caplog.at_level(logging.INFO, logger="pl_dpo.sharding"):
        sh = shd.logical_to_shardings(tree, mesh, rules)
    assert sh["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert sh["layers"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["embed"]["embedding"].spec == P(None, "fsdp")
    assert sh["lm_head"]["kernel"].spec == P("fsdp")
    assert "embed/embedding" in caplog.text and "not divisible" in caplog.text
    with pytest.raises(ValueError, match="'lm_head/kernel'.*2 dims.*shape \\(16,\\)"):
        shd.logical_to_shardings({"lm_head": {"kernel": sds(16)}}, mesh, rules)
    with pytest.raises(ValueError, match="axis 'model' not in mesh"):
        shd.spec_for("w", (4, 4), mesh, [("w", P("model"))])


# ----------------------------------------------------------------------------- creation


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


def test_create_sharded_module_and_optimizer_2x2x2():
    mesh = shd.make_mesh(2, 2, 2)
    model = shd.create_sharded_module(lambda: TinyDecoder(nnx.Rngs(0)), mesh, shd.DEFAULT_DECODER_RULES)
    params = nnx.state(model, nnx.Param)
    got = {shd.path_to_str(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert got["embed/embedding"] == P("tensor", "fsdp")
    assert got["layers/0/attn/q_proj/kernel"] == P("fsdp", "tensor")
    assert got["layers/1/attn/q_proj/bias"] == P("tensor")
    assert got["layers/0/attn/o_proj/kernel"] == P("tensor", "fsdp")
    assert got["layers/1/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert got["layers/1/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    assert got["layers/0/input_layernorm/scale"] == P()
    assert got["final_norm/scale"] == P()
    assert got["lm_head/kernel"] == P("fsdp", "tensor")
    # Each device holds a quarter of a [D, F] kernel: never the whole matrix.
    assert _shard_shape(model.layers[0].mlp.up_proj.kernel.get_value()) == (D // 2, F // 2)
    # Same values as an unsharded construction (the init is deterministic in the seed).
    ref = nnx.state(TinyDecoder(nnx.Rngs(0)), nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref)

    opt = create_sharded_optimizer(model, optax.adamw(1e-3), mesh, shd.DEFAULT_DECODER_RULES)
    mu = opt.opt_state[0].mu
    assert mu["layers"][0]["mlp"]["up_proj"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    assert _shard_shape(mu["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()) == (D // 2, F // 2)
    assert opt.opt_state[0].count.get_value().sharding.spec == P()


def test_create_sharded_plain_pytree():
    mesh = shd.make_mesh(1, 4, 2)
    init = lambda: {"lm_head": {"kernel": jnp.ones((D, V))}, "step": jnp.zeros((), jnp.int32)}
    out = create_sharded(init, mesh, shd.DEFAULT_DECODER_RULES)
    assert out["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert _shard_shape(out["lm_head"]["kernel"]) == (D // 4, V // 2)
    assert out["step"].sharding.spec == P()


def test_shard_batch():
    mesh = shd.make_mesh(2, 2, 2)
    batch = {"tokens": np.arange(8 * 5).reshape(8, 5), "mask": np.ones((8, 5), bool)}
    out = shd.shard_batch(batch, mesh)
    assert out["tokens"].sharding == shd.batch_sharding(mesh)
    assert _shard_shape(out["tokens"]) == (2, 5)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
    with pytest.raises(ValueError, match="'tokens'.*global batch 6.*data\\*fsdp=4"):
        shd.shard_batch({"tokens": np.zeros((6, 5))}, mesh)


# ----------------------------------------------------------------------------- step parity


def _train(mesh, tokens_BxL, n_steps=3):
    rules = shd.DEFAULT_DECODER_RULES
    model = shd.create_sharded_module(lambda: TinyDecoder(nnx.Rngs(0)), mesh, rules)
    opt = create_sharded_optimizer(model, optax.adamw(1e-2, eps=1e-6), mesh, rules)
    gdef, mstate = nnx.split(model)
    odef, ostate = nnx.split(opt)
    m_sh = jax.tree.map(lambda x: x.sharding, mstate)
    o_sh = jax.tree.map(lambda x: x.sharding, ostate)
    b_sh = shd.batch_sharding(mesh)

    def step(mstate, ostate, tokens):
        model, opt = nnx.merge(gdef, mstate), nnx.merge(odef, ostate)
        loss, grads = nnx.value_and_grad(nll)(model, tokens)
        opt.update(model, grads)
        return nnx.state(model), nnx.state(opt), loss

    step = jax.jit(step, in_shardings=(m_sh, o_sh, b_sh), out_shardings=(m_sh, o_sh, None), donate_argnums=(0, 1))
    tokens = shd.shard_batch(tokens_BxL, mesh)
    losses = []
    for _ in range(n_steps):
        mstate, ostate, loss = step(mstate, ostate, tokens)
        losses.append(loss)
    return np.asarray(losses), jax.tree.map(np.asarray, nnx.to_pure_dict(mstate)), mstate


def test_sharded_step_matches_single_device():
    tokens = np.random.default_rng(0).integers(0, V, (8, L + 1)).astype(np.int32)
    loss1, params1, _ = _train(shd.make_mesh(devices=jax.devices()[:1]), tokens)
    loss8, params8, state8 = _train(shd.make_mesh(2, 2, 2), tokens)
    # float32; only the reduction order differs between 1 and 8 devices.
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params8, params1)
    assert loss1[-1] < loss1[0]  # the step trains
    assert state8["layers"][0]["attn"]["q_proj"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_default_rules_cover_the_project_decoder(preset):
    """Every parameter of the real Decoder (stacked layers) is matched by a rule."""
    from pl_dpo.models import decoder, presets

    cfg = presets.preset_config(preset)
    abstract = nnx.state(nnx.eval_shape(lambda: decoder.create_model(cfg, seed=0)), nnx.Param)
    mesh = shd.make_mesh(2, 2, 2)
    sh = shd.logical_to_shardings(abstract, mesh, shd.DEFAULT_DECODER_RULES, error_on_unmatched=True)
    got = {shd.path_to_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    assert got["embed/embedding"] == P("tensor", "fsdp")
    assert got["layers/attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
    assert got["layers/attn/o_proj/kernel"] == P(None, "tensor", "fsdp")
    assert got["layers/mlp/gate_proj/kernel"] == P(None, "fsdp", "tensor")
    assert got["layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
    assert got["layers/input_norm/scale"] == P()
    assert got["final_norm/scale"] == P()
    if "lm_head/kernel" in got:
        assert got["lm_head/kernel"] == P("fsdp", "tensor")
    if preset == "tiny-qwen2":
        assert got["layers/attn/k_proj/bias"] == P(None, "tensor")
