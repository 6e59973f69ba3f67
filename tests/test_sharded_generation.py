"""Generation and scoring laid out for throughput: the batch split over the mesh, the same results as one device.

On the 8 simulated CPU devices of tests/conftest.py; the AOT checks compile for a v5e-16 with libtpu (skipped
without it)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import left_padded_prompts

from pl_dpo import decode_layout, sampler, scoring, sharding
from pl_dpo.data import RankedBatch, RankedSet
from pl_dpo.models import create_model, preset_config

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return create_model(preset_config("tiny-llama", vocab_size=VOCAB), seed=0)


def _sharded(model, data=1, fsdp=-1, tensor=1):
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES))
    return nnx.merge(graphdef, state)


def _prompts(batch, length=12, seed=0):
    return left_padded_prompts(batch, VOCAB, length, seed)


@pytest.mark.parametrize(
    "greedy, mesh, tp",
    [(True, (1, -1, 1), None), (False, (1, -1, 1), None), (False, (2, 2, 2), 2)],
    ids=["greedy-batch8", "sampled-batch8", "sampled-batch2x2-tensor2x2"],
)
def test_sharded_generation_gives_one_devices_tokens(model, greedy, mesh, tp):
    cfg = sampler.SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, greedy=greedy, pad_id=0)
    tokens, valid = _prompts(11)  # 11 rows -> 16, split 8 (or 2) ways
    ref = sampler.generate(model, tokens, valid, 7, cfg)
    assert len(ref.tokens_BxT.devices()) == 1
    sharded = _sharded(model, *mesh)
    weights = decode_layout.decode_weights(sharded, 16, 16 + 6, tp=tp)
    assert weights.layout.groups == (8 if tp is None else 2)
    out = sampler.generate(sharded, tokens, valid, 7, cfg, weights=weights)
    assert out.tokens_BxT.shape == (11, 6)
    # The rows were split over the batch groups (the KV cache with them).
    assert len(out.tokens_BxT.devices()) == 8
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT), np.asarray(ref.tokens_BxT))
    np.testing.assert_array_equal(np.asarray(out.lengths_B), np.asarray(ref.lengths_B))
    np.testing.assert_allclose(np.asarray(out.logprobs_BxT), np.asarray(ref.logprobs_BxT), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.model_logprobs_BxT), np.asarray(ref.model_logprobs_BxT), atol=1e-5)


def test_generate_responses_on_the_mesh_gives_one_devices_responses(model):
    """The whole pass (length grouping, a key per prompt, one gather at the end) with the weights in a chosen
    tensor-parallel group (`sampling.decode_tp`) samples what one device samples; a group that does not divide
    the fsdp size is refused."""
    cfg = sampler.SamplingConfig(max_new_tokens=5, temperature=1.0, pad_id=0, eos_ids=(1,))
    tokens, valid = _prompts(21)
    arrays = {"prompt_tokens_NxP": tokens, "prompt_valid_NxP": valid}
    key = jax.random.key(11)
    ref = sampler.generate_responses(model, arrays, cfg, key, batch_size=8, eos_id=1)
    sharded = _sharded(model)
    assert sampler.generate_responses(sharded, arrays, cfg, key, batch_size=8, eos_id=1, tp=2) == ref
    with pytest.raises(ValueError, match="decode_tp=3 must divide the mesh's fsdp size 8"):
        sampler.generate_responses(sharded, arrays, cfg, key, batch_size=8, eos_id=1, tp=3)


def test_decode_weights_are_per_layer_in_the_compute_dtype(model):
    sharded = _sharded(model, 1, -1, 1)
    weights = decode_layout.decode_weights(sharded, 8, 32, tp=2)
    assert len(weights.layers) == model.config.num_layers
    q = weights.layers[0]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == model.layers.attn.q_proj.kernel.shape[1:]
    assert q.dtype == np.dtype(model.config.compute_dtype)
    # Column-parallel over the 2 tensor chips, whole on the batch axes: no gather left for the decode loop.
    assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // 2)
    assert len(q.devices()) == 8


def test_tensor_split_rule():
    cfg = preset_config("mistral-7b", compute_dtype="bfloat16")
    gib = 2**30
    # 13.5 GiB of bf16 weights on 16 GiB chips: 4 chips hold them within half a chip each, the batch over 4 groups.
    assert decode_layout.decode_tp_split(cfg, (1, 16, 1), 256, 1024, 16 * gib) == 4
    # 95 GiB chips: one chip holds them; the batch split 16 ways.
    assert decode_layout.decode_tp_split(cfg, (1, 16, 1), 256, 1024, 95 * gib) == 1
    # No more batch groups than rows; no memory figure (CPU): as few tensor chips as the rows allow.
    assert decode_layout.decode_tp_split(cfg, (1, 16, 1), 4, 1024, None) == 4
    assert decode_layout.decode_tp_split(cfg, (1, 8, 1), 64, 1024, None) == 1


def _ranked(n=13, k=2, length=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (n, k, length)).astype(np.int32)
    valid = np.ones((n, k), bool)
    valid[3, 1] = False
    return RankedSet(
        tokens_NxKxL=tokens,
        loss_mask_NxKxL=np.broadcast_to(np.arange(length) >= 10, (n, k, length)).copy(),
        attn_valid_NxKxL=np.ones((n, k, length), bool),
        valid_NxK=valid,
    )


@pytest.mark.parametrize("mesh", [(1, -1, 1), (2, 2, 2)], ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_sharded_scoring_gives_one_devices_logprobs(model, mesh):
    arrays = _ranked()
    ref = scoring.score_ranked(model, arrays, 4, batch_type=RankedBatch)
    out = scoring.score_ranked(
        _sharded(model, *mesh), arrays, 4, batch_type=RankedBatch
    )  # batch 4 -> 8 on 8 shards; 13 rows
    assert out.shape == ref.shape == (13, 2) and out[3, 1] == 0.0
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- compiled for a v5e-16


def _while_bodies(hlo: str) -> dict[str, str]:
    """Computation name -> text, for every while loop's body (and what it calls, one level down)."""
    comps = {}
    for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.DOTALL | re.MULTILINE):
        comps[m.group(1)] = m.group(2)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    out = {}
    for name in bodies:
        text = comps.get(name, "")
        out[name] = text
        for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", text):
            out[called] = comps.get(called, "")
    return out


def test_aot_v5e16_decode_splits_the_batch_and_gathers_no_weights_in_the_loop():
    pytest.importorskip("libtpu")
    from pl_dpo.plan import lower, programs, slices

    s = slices.get_slice("v5e-16")
    mesh = sharding.make_mesh(1, -1, 1, devices=slices.abstract_devices(s))
    cfg = preset_config("tiny-llama", vocab_size=512, compute_dtype="bfloat16")
    program = programs.Program("sampler", "sample", cfg, batch=64, prompt_len=64, new_tokens=16)
    compiled = lower.lower(program, mesh).compile()
    # Arguments: the FSDP weights, then prompts/valid/keys split 16 ways (4 rows per chip).
    tokens_sh, valid_sh = jax.tree.leaves(compiled.input_shardings[0])[-3:-1]
    assert tokens_sh.shard_shape((64, 64)) == valid_sh.shard_shape((64, 64)) == (4, 64)  # 64 rows / 16 chips
    hlo = compiled.as_text()
    bodies = _while_bodies(hlo)
    assert bodies, "no while loop in the compiled sampler"
    gathers = sum(len(re.findall(r"\ball-gather(?:-start)?\(", t)) for t in bodies.values())
    assert gathers == 0, f"{gathers} all-gathers inside the decode loop"
    # The weights are gathered once, before the loop.
    assert re.search(r"\ball-gather(?:-start)?\(", hlo)
