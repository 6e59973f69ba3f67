"""Decoder internals: cache vs full forward, padding sides, dtypes, remat, sharded load, presets, bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from pl_dpo.models import (
    DecoderConfig,
    create_model,
    from_hf_config,
    from_pretrained,
    positions_from_valid,
    preset_config,
    preset_names,
    save_pretrained,
)
from pl_dpo.models.hf_io import ModelFolderError


@pytest.fixture(scope="module")
def model():
    return create_model(preset_config("tiny-qwen2", vocab_size=97), seed=0)


def _forward(model, tokens, valid):
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
    return model(tokens, positions_from_valid(valid), valid)


def test_left_and_right_padding_agree(model):
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 97, 6)
    left = np.zeros((1, 9), np.int32)
    left[0, 3:] = seq
    right = np.zeros((1, 9), np.int32)
    right[0, :6] = seq
    h_left = _forward(model, left, np.arange(9)[None] >= 3)
    h_right = _forward(model, right, np.arange(9)[None] < 6)
    np.testing.assert_allclose(h_left[0, 3:], h_right[0, :6], atol=1e-5)
    alone = _forward(model, seq[None], np.ones((1, 6), bool))
    np.testing.assert_allclose(alone[0], h_right[0, :6], atol=1e-5)


def test_incremental_decode_matches_full_forward(model):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, (2, 8)).astype(np.int32)
    valid = np.ones((2, 8), bool)
    valid[1, :3] = False  # left padded row
    full = _forward(model, tokens, valid)
    positions = positions_from_valid(jnp.asarray(valid))
    cache = model.init_cache(2, 10)
    h, cache = model.decode(jnp.asarray(tokens[:, :5]), positions[:, :5], jnp.asarray(valid[:, :5]), cache, 0)
    steps = [h]
    for i in range(5, 8):
        h, cache = model.decode(
            jnp.asarray(tokens[:, i : i + 1]),
            positions[:, i : i + 1],
            jnp.asarray(valid[:, i : i + 1]),
            cache,
            jnp.int32(i),
        )
        steps.append(h)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[valid], np.asarray(full)[valid], atol=1e-5)


def test_bf16_compute_close_to_f32_and_remat_and_xla_attention_equal():
    cfg = preset_config("tiny-llama3", num_layers=2)
    ref = create_model(cfg, seed=3)
    tokens = np.random.default_rng(2).integers(0, 512, (2, 7)).astype(np.int32)
    valid = np.ones((2, 7), bool)
    valid[0, :2] = False
    h32 = _forward(ref, tokens, valid)
    state = nnx.state(ref)
    variants = {
        "bf16": dict(compute_dtype="bfloat16"),
        "full": dict(remat="full"),
        "dots": dict(remat="dots"),
        "xla": dict(attention_impl="xla"),
    }
    for name, change in variants.items():
        m = create_model(cfg.replace(**change), seed=0)
        nnx.update(m, state)
        h = _forward(m, tokens, valid)
        assert h.dtype == (jnp.bfloat16 if name == "bf16" else jnp.float32)
        tol = 0.1 if name == "bf16" else 1e-5
        np.testing.assert_allclose(np.asarray(h, np.float32)[valid], np.asarray(h32)[valid], atol=tol, err_msg=name)

    def loss(m):
        return jnp.sum(m.logits(_forward(m, tokens, valid)) ** 2)

    g_ref = jax.tree.leaves(nnx.grad(loss)(ref))
    for remat in ("dots", "offload_dots"):
        m = create_model(cfg.replace(remat=remat), seed=0)
        nnx.update(m, state)
        for a, b in zip(g_ref, jax.tree.leaves(jax.jit(nnx.grad(loss))(m))):
            # Jitted against eager: XLA fuses and orders the sums differently (gradients up to ~3 here;
            # a remat bug would be off by O(1), not by float32 rounding).
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=remat)


def test_param_paths_and_preset_sizes():
    cfg = preset_config("tiny-llama")
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(create_model(cfg, seed=0)))}
    assert {
        "embed/embedding",
        "layers/attn/q_proj/kernel",
        "layers/mlp/down_proj/kernel",
        "final_norm/scale",
        "lm_head/kernel",
        "layers/input_norm/scale",
    } <= paths
    for name in preset_names():
        c = preset_config(name)
        abstract = nnx.eval_shape(lambda c=c: create_model(c, seed=0))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
        assert n == c.num_params()
        if name.startswith("tiny"):
            assert 1e5 <= n <= 5e6
    assert abs(preset_config("llama-3.2-1b").num_params() - 1.2358e9) < 1e6


def test_sharded_load_and_index_file_and_bf16_export(model, tmp_path):
    save_pretrained(model, str(tmp_path / "full"))
    # Re-write as two shards with an index, as large Hugging Face checkpoints are stored.
    tensors = load_file(str(tmp_path / "full" / "model.safetensors"))
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    os.makedirs(shard_dir)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(shard_dir / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (shard_dir / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    mesh = jax.make_mesh((len(jax.devices()),), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))

    def rule(path, shape):
        spec = [None] * len(shape)
        if path.endswith("kernel") and shape[-1] % mesh.size == 0:
            spec[-1] = "tensor"
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    loaded = from_pretrained(str(shard_dir), shardings=rule)
    kernel = loaded.layers.attn.q_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    valid = np.ones((2, 6), bool)
    np.testing.assert_allclose(_forward(loaded, tokens, valid), _forward(model, tokens, valid), atol=1e-5)

    # The pytree form, as pl_dpo.sharding builds it from its regex rules.
    from pl_dpo import sharding

    abstract_state = nnx.state(nnx.eval_shape(lambda: create_model(model.config, seed=0)))
    mesh3 = sharding.make_mesh(data=1, fsdp=-1, tensor=2)
    tree = sharding.logical_to_shardings(abstract_state, mesh3, sharding.DEFAULT_DECODER_RULES)
    loaded3 = from_pretrained(str(shard_dir), shardings=tree)
    assert loaded3.layers.mlp.down_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    np.testing.assert_allclose(_forward(loaded3, tokens, valid), _forward(model, tokens, valid), atol=1e-5)

    save_pretrained(loaded, str(tmp_path / "bf16"), dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = from_pretrained(str(tmp_path / "bf16"), param_dtype="bfloat16", compute_dtype="bfloat16")
    assert back.embed.embedding[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(_forward(back, tokens, valid), np.float32), _forward(model, tokens, valid), atol=0.1
    )


# -------------------------------------------------------------------------------------------------- bad input
def _saved(model, tmp_path):
    folder = tmp_path / "m"
    save_pretrained(model, str(folder))
    return folder, json.loads((folder / "config.json").read_text())


def test_bad_config_errors_name_the_field(model, tmp_path):
    folder, hf = _saved(model, tmp_path)
    (folder / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "intermediate_size"}))
    with pytest.raises(ValueError, match="'intermediate_size' is missing"):
        from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        from_pretrained(str(folder))
    with pytest.raises(ValueError, match="num_kv_heads"):
        from_hf_config({**hf, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="remat"):
        DecoderConfig(**{**preset_config("tiny-llama").__dict__, "remat": "sometimes"})
    with pytest.raises(ModelFolderError, match="nowhere/config.json does not exist"):
        from_pretrained(str(tmp_path / "nowhere"))
    (folder / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ModelFolderError, match=r"config.json: model_type='gpt2' .* is not supported"):
        from_pretrained(str(folder))  # the user error main reports in one line


def test_bad_tensor_errors_name_the_tensor(model, tmp_path):
    folder, _ = _saved(model, tmp_path)
    file = str(folder / "model.safetensors")
    tensors = load_file(file)
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:, :-1].copy()
    save_file(bad, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        from_pretrained(str(folder))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_proj.bias"}, file)
    with pytest.raises(ValueError, match=rf"{folder}: tensor 'model\.layers\.0\.self_attn\.k_proj\.bias' is missing"):
        from_pretrained(str(folder))
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}, file)
    with pytest.raises(ValueError, match=r"not used.*o_proj\.bias"):
        from_pretrained(str(folder))
    # A truncated file (a copy cut short) names the file.
    save_file(tensors, file)
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{file}: cannot read"):
        from_pretrained(str(folder))
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(str(folder))


def test_legacy_rope_fields_are_read():
    hf = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "rope_theta": 5e5,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "eos_token_id": [2, 7],
    }
    cfg = from_hf_config(hf)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling_dict["rope_type"] == "llama3" and cfg.head_dim == 4
    assert cfg.eos_ids == (2, 7) and cfg.num_kv_heads == 2
    assert from_hf_config({**hf, "rope_scaling": None, "rope_theta": None}).rope_theta == 10000.0
