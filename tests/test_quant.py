"""Weight-only int8 sampling (pl_dpo.models.quant, decode_layout with int8): the quantizer against float64 numpy,
the int8 decode against decoding the dequantized weights, sharded against one device, and the planner's row."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import left_padded_prompts

from pl_dpo import decode_layout, sampler, sharding
from pl_dpo.models import create_model, from_pretrained, preset_config, save_pretrained
from pl_dpo.models.lora import projections
from pl_dpo.models.quant import Int8Kernel, dequantize, quantize_int8

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return create_model(preset_config("tiny-llama", vocab_size=VOCAB), seed=0)


def _prompts(batch, length=12, seed=0):
    return left_padded_prompts(batch, VOCAB, length, seed)


def test_int8_quantization_against_float64_numpy():
    kernel = np.random.default_rng(0).normal(size=(3, 40, 24)).astype(np.float32)
    kernel[1, :, 5] = 0.0  # a zero column: scale 1, all zeros
    q = quantize_int8(jnp.asarray(kernel))
    k64 = kernel.astype(np.float64)
    absmax = np.abs(k64).max(axis=-2)
    scale = np.where(absmax > 0, absmax / 127, 1.0)
    want_q = np.clip(np.round(k64 / scale[..., None, :]), -127, 127)
    assert q.q.dtype == jnp.int8 and q.scale.shape == (3, 24)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    # float32 division may round a value sitting at .5 the other way: at most one step, and rarely.
    assert np.abs(np.asarray(q.q, np.float64) - want_q).max() <= 1 and np.mean(np.asarray(q.q) != want_q) < 1e-3
    err = np.abs(np.asarray(dequantize(q), np.float64) - k64)
    assert (err <= scale[..., None, :] / 2 + 1e-6).all()  # half a step per column at most


def test_a_linear_layer_with_int8_weights_is_x_times_q_times_scale(model):
    linear = projections(model)["layers/mlp/up_proj"]
    layer0 = nnx.merge(nnx.graphdef(linear), jax.tree.map(lambda v: v[0], nnx.state(linear)))
    kernel = quantize_int8(layer0.kernel[...])
    layer0.kernel.set_value(kernel)
    x = np.random.default_rng(1).normal(size=(4, linear.kernel.shape[-2]))
    want = x @ (np.asarray(kernel.q, np.float64) * np.asarray(kernel.scale, np.float64)[None, :])
    np.testing.assert_allclose(np.asarray(layer0(jnp.asarray(x, jnp.float32))), want, rtol=1e-5, atol=1e-5)


def _dequantized(model):
    """The model with every layer projection replaced by its int8 round trip (in float32)."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        name = "/".join(map(str, path))
        if name.startswith("layers/") and name.endswith("_proj/kernel"):
            var.set_value(dequantize(quantize_int8(var[...]), var[...].dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_int8_decoding_equals_decoding_the_dequantized_weights(model, greedy):
    cfg = sampler.SamplingConfig(max_new_tokens=8, temperature=0.9, greedy=greedy, pad_id=0)
    tokens, valid = _prompts(6)
    weights = decode_layout.decode_weights(model, 8, 16 + 8, int8=True)
    q_proj = weights.layers[0]["layers"]["attn"]["q_proj"]["kernel"][...]
    assert isinstance(q_proj, Int8Kernel) and q_proj.q.dtype == jnp.int8
    assert weights.rest["embed"]["embedding"][...].dtype == jnp.float32  # embedding (and head) as trained
    got = sampler.generate(model, tokens, valid, 3, dataclasses.replace(cfg, int8=True), weights=weights)
    want = sampler.generate(_dequantized(model), tokens, valid, 3, cfg)
    np.testing.assert_array_equal(np.asarray(got.tokens_BxT), np.asarray(want.tokens_BxT))
    # And the int8 switch goes through generate itself.
    again = sampler.generate(model, tokens, valid, 3, dataclasses.replace(cfg, int8=True))
    np.testing.assert_array_equal(np.asarray(again.tokens_BxT), np.asarray(want.tokens_BxT))


def test_sharded_int8_decoding_gives_one_devices_tokens(model):
    cfg = sampler.SamplingConfig(max_new_tokens=6, greedy=True, pad_id=0, int8=True)
    tokens, valid = _prompts(11)
    ref = sampler.generate(model, tokens, valid, 7, cfg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES))
    sharded = nnx.merge(graphdef, state)
    weights = decode_layout.decode_weights(sharded, 16, 16 + 6, tp=2, int8=True)
    out = sampler.generate(sharded, tokens, valid, 7, cfg, weights=weights)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT), np.asarray(ref.tokens_BxT))


def test_the_decode_split_counts_int8_weights_at_one_byte():
    """A 7B model sampling 16 rows on a v5e-8: its bf16 weights need 2 chips per tensor group, int8 ones 1."""
    cfg = preset_config("mistral-7b", compute_dtype="bfloat16", param_dtype="bfloat16")
    hbm = 16 * 2**30
    bf16 = decode_layout.decode_tp_split(cfg, (1, 8, 1), 16, 1024, hbm)
    int8 = decode_layout.decode_tp_split(cfg, (1, 8, 1), 16, 1024, hbm, int8=True)
    assert (bf16, int8) == (2, 1)


@pytest.mark.parametrize("int8", [False, True], ids=["as-trained", "int8"])
def test_a_model_folder_loads_straight_into_the_decode_layout_as_from_pretrained_would(model, tmp_path, int8):
    """An assistant sampled as shipped: read into the decode layout with no training-layout copy, the same weights
    bit for bit and the same tokens as loading it for training and moving it, on a 2x2x2 mesh (tp 2)."""
    save_pretrained(model, str(tmp_path))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.DEFAULT_DECODER_RULES
    _, target = nnx.split(nnx.eval_shape(lambda: create_model(model.config, seed=0)))
    trained = from_pretrained(str(tmp_path), shardings=sharding.logical_to_shardings(target, mesh, rules))
    want = decode_layout.decode_weights(trained, 16, 22, tp=2, int8=int8)
    folder = decode_layout.ModelFolder(str(tmp_path), model.config, mesh)
    got = decode_layout.decode_weights(folder, 16, 22, tp=2, int8=int8)
    assert got.layout.mesh.shape == want.layout.mesh.shape
    for a, b in zip(jax.tree.leaves((got.rest, got.layers)), jax.tree.leaves((want.rest, want.layers))):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg = sampler.SamplingConfig(max_new_tokens=6, greedy=True, pad_id=0, int8=int8)
    tokens, valid = _prompts(11)
    out = sampler.generate(folder, tokens, valid, 7, cfg, weights=got)
    ref = sampler.generate(trained, tokens, valid, 7, cfg, weights=want)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT), np.asarray(ref.tokens_BxT))


def test_no_sample_takes_an_id_past_the_tokenizers():
    """A model with more embedding rows than its tokenizer has ids: those ids are never drawn, greedy or not."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, 10)), jnp.float32).at[:, 8:].add(50.0)
    keys = jax.random.split(jax.random.key(0), 64)
    for greedy in (True, False):
        cfg = sampler.SamplingConfig(max_new_tokens=1, greedy=greedy, num_ids=8)
        tokens, lp, model_lp = sampler.sample_logits(logits, keys, cfg)
        assert int(tokens.max()) < 8 and np.isfinite(np.asarray(model_lp)).all()
        full = sampler.sample_logits(logits, keys, dataclasses.replace(cfg, num_ids=0))[0]
        assert int(full.min()) >= 8  # without the limit those ids win


@pytest.mark.slow
def test_an_assistant_used_as_shipped_samples_in_int8_from_its_folder(tmp_path, main_command):
    """aSFT with an assistant from a model folder, no SFT, int8 sampling: read straight into the decode layout (no
    training copy, no checkpoint of it), its samples within the tokenizer's ids although its embedding is larger."""
    from pl_dpo.selfplay import stages
    from pl_dpo.tokenizer import load_tokenizer

    save_pretrained(create_model(preset_config("tiny-llama", vocab_size=384), seed=3), str(tmp_path / "assistant"))
    run = main_command.run(
        tmp_path / "run",
        "--config.modes=asft",
        f"--config.assistants[0].model.hf_path={tmp_path / 'assistant'}",
        "--config.assistants[0].sft_steps=0",
        "--config.assistants[0].model.sample_int8=True",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| asft round 1 |" in run.stdout
    assert not (tmp_path / "run" / "assistant_0" / "policies").exists()
    samples = stages.load_samples(str(tmp_path / "run" / "assistant_0" / "samples.npz"))
    vocab = len(load_tokenizer(str(tmp_path / "run" / "tokenizer")))
    assert vocab < 384 and samples and max(max(s) for s in samples if s) < vocab
