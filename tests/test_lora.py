"""LoRA (pl_dpo.models.lora): the adapter math, merging, training only the adapters, and PEFT folders read by peft."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pl_dpo import sharding
from pl_dpo.models import create_model, lora, peft_io, positions_from_valid, preset_config, save_pretrained
from pl_dpo.training import train

CFG = preset_config("tiny-llama", vocab_size=96)
LORA = lora.LoraConfig(rank=4, alpha=8.0, rslora=False, targets=r"(q|k|v|o|gate|up|down)_proj$")


def _tokens(batch: int = 3, length: int = 10):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, (batch, length)), jnp.int32)
    valid = jnp.asarray(np.arange(length)[None] >= np.array([0, 3, 6])[:batch, None])
    return tokens, positions_from_valid(valid), valid


def _logits(model, tokens, positions, valid) -> np.ndarray:
    return np.asarray(model.logits(model(tokens, positions, valid)))


def _with_random_adapters(seed: int = 0, config: lora.LoraConfig = LORA):
    """The tiny model with adapters whose B is random too (a fresh adapter changes nothing)."""
    model = create_model(CFG, seed=seed)
    lora.add_adapters(model, config, jax.random.key(seed))
    for i, linear in enumerate(lora.projections(model).values()):
        if linear.lora_b is not None:
            linear.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(100 + i), linear.lora_b.shape))
    return model


def _train_adapters(model, mesh, rules, steps: int):
    """`steps` Adam steps of the real train step on one batch, raising the log-prob of token 5 everywhere.
    Returns (graphdef, final TrainState, the losses)."""
    tx = optax.adam(1e-2)
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, rules)
    tokens, positions, valid = _tokens()

    def objective(m, batch):
        return -jnp.mean(jax.nn.log_softmax(m.logits(m(tokens, positions, valid)))[..., 5]), {}

    step = train.make_train_step(graphdef, objective, tx, state_sh, None)
    losses = []
    for _ in range(steps):
        params, opt_state, metrics = step(state.params, state.opt_state, None, state.frozen)
        state = train.TrainState(params, opt_state, state.frozen)
        losses.append(float(metrics["loss"]))
    return graphdef, state, losses


def test_a_fresh_adapter_leaves_the_model_bit_for_bit():
    base = create_model(CFG, seed=0)
    adapted = create_model(CFG, seed=0)
    lora.add_adapters(adapted, LORA, jax.random.key(0))
    batch = _tokens()
    assert np.array_equal(_logits(base, *batch), _logits(adapted, *batch))
    assert np.array_equal(_logits(base, *batch), _logits(lora.merge(adapted), *batch))


def test_the_adapter_forward_is_base_plus_scaled_low_rank_product_in_float64():
    """One projection against a float64 numpy x @ W + (alpha/r) x @ A @ B (and alpha/sqrt(r) with rsLoRA)."""
    for rslora, scale in ((False, 8.0 / 4), (True, 8.0 / 2)):
        config = lora.LoraConfig(rank=4, alpha=8.0, rslora=rslora, targets="q_proj$")
        model = _with_random_adapters(config=config)
        linear = lora.projections(model)["layers/attn/q_proj"]
        assert linear.lora_scale == scale
        x = np.random.default_rng(1).normal(size=(5, CFG.hidden_size))
        w, a, b = (np.asarray(v[...], np.float64)[0] for v in (linear.kernel, linear.lora_a, linear.lora_b))
        want = x @ w + scale * (x @ a) @ b
        layer0 = nnx.merge(nnx.graphdef(linear), jax.tree.map(lambda v: v[0], nnx.state(linear)))
        np.testing.assert_allclose(np.asarray(layer0(jnp.asarray(x, jnp.float32))), want, rtol=2e-5, atol=2e-5)


def test_merged_forward_equals_base_plus_adapter_forward():
    model = _with_random_adapters()
    batch = _tokens()
    unmerged = _logits(model, *batch)
    merged = lora.merge(model)
    assert not lora.has_adapters(merged) and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(_logits(merged, *batch), unmerged, rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_the_base_stays_as_it_was():
    mesh, rules = sharding.make_mesh(1, -1, 1), sharding.DEFAULT_DECODER_RULES
    model = sharding.create_sharded_module(lambda: create_model(CFG, seed=0), mesh, rules)
    base_kernel = np.asarray(model.layers.attn.q_proj.kernel[...])
    lora.add_adapters(model, LORA, jax.random.key(0), sharding.placement(mesh, rules))
    assert model.layers.attn.q_proj.lora_a.sharding.spec == sharding.P(None, "fsdp")
    graphdef, state, losses = _train_adapters(model, mesh, rules, steps=5)
    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
    assert trained and all(p.endswith(("lora_a", "lora_b")) for p in trained)
    # Only the adapters have optimizer moments: Adam's state is 2x the adapters, not 2x the model.
    sizes = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert sizes(state.opt_state) <= 2 * sizes(state.params) + 8
    assert losses[-1] < losses[0]
    model = nnx.merge(graphdef, state.params, state.frozen)
    assert np.array_equal(np.asarray(model.layers.attn.q_proj.kernel[...]), base_kernel)
    assert np.abs(np.asarray(model.layers.attn.q_proj.lora_b[...])).max() > 0


def test_targets_select_projections_and_a_pattern_matching_none_lists_them():
    model = create_model(CFG, seed=0)
    config = lora.LoraConfig(rank=2, alpha=2.0, rslora=False, targets=r"attn/(q|v)_proj$")
    assert sorted(lora.targets(model, config)) == ["layers/attn/q_proj", "layers/attn/v_proj"]
    with pytest.raises(lora.LoraError, match=r"targets='qkv' matches no projection.*layers/attn/q_proj"):
        lora.targets(model, lora.LoraConfig(rank=2, alpha=2.0, rslora=False, targets="qkv"))
    for bad, match in ((dict(rank=0), "rank=0 must be"), (dict(rank=-2), "rank=-2"), (dict(alpha=0.0), "alpha=0.0")):
        with pytest.raises(lora.LoraError, match=match):
            lora.LoraConfig(**{"rank": 2, "alpha": 2.0, "rslora": False, "targets": "q_proj", **bad})


def test_a_peft_folder_round_trips_and_names_a_tensor_of_the_wrong_shape(tmp_path):
    model = _with_random_adapters()
    peft_io.save_peft_adapter(model, str(tmp_path / "adapter"), LORA, base_model="base")
    config = json.loads((tmp_path / "adapter" / peft_io.CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    loaded = create_model(CFG, seed=0)
    read = peft_io.load_peft_adapter(loaded, str(tmp_path / "adapter"))
    assert read.scale == LORA.scale
    batch = _tokens()
    assert np.array_equal(_logits(loaded, *batch), _logits(model, *batch))

    other = preset_config("tiny-llama", vocab_size=96, hidden_size=32, head_dim=8)
    with pytest.raises(
        lora.LoraError, match=r"tensor 'base_model\.model\.model\.layers\.0\..*lora_[AB]\.weight' has shape"
    ):
        peft_io.load_peft_adapter(create_model(other, seed=0), str(tmp_path / "adapter"))


def test_peft_loads_the_adapter_on_the_hf_model_with_equal_logits(tmp_path):
    """The exported base + the PEFT folder in peft (PyTorch), against pl_dpo's unmerged forward."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _with_random_adapters()
    tokens, positions, valid = _tokens()
    ours = _logits(model, tokens, positions, valid)
    base = create_model(CFG, seed=0)
    save_pretrained(base, str(tmp_path / "base"))
    peft_io.save_peft_adapter(model, str(tmp_path / "adapter"), LORA, base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()

    def torch_logits(module) -> np.ndarray:
        with torch.no_grad():
            inputs = {"input_ids": tokens, "attention_mask": valid, "position_ids": positions}
            return module(
                **{k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in inputs.items()}
            ).logits.numpy()

    mask = np.asarray(valid)
    np.testing.assert_allclose(ours[mask], torch_logits(hf)[mask], rtol=1e-4, atol=1e-4)
    # And merged in peft equals merged here.
    theirs_merged = torch_logits(hf.merge_and_unload())
    np.testing.assert_allclose(
        _logits(lora.merge(model), tokens, positions, valid)[mask], theirs_merged[mask], rtol=1e-4, atol=1e-4
    )
    assert os.path.exists(tmp_path / "adapter" / peft_io.WEIGHTS_FILE)


def test_the_harness_backend_takes_a_peft_folder_on_its_model(tmp_path):
    """`--model_args path=<base>,peft=<adapter>`, as lm-eval's hf backend takes peft=: the adapter merged in."""
    pytest.importorskip("lm_eval")
    from pl_dpo.harness.lm import PlDpoLM
    from pl_dpo.tokenizer import build_tiny_tokenizer

    model = _with_random_adapters()
    peft_io.save_peft_adapter(model, str(tmp_path / "adapter"), LORA, base_model=str(tmp_path / "base"))
    save_pretrained(create_model(CFG, seed=0), str(tmp_path / "base"))
    build_tiny_tokenizer(str(tmp_path / "base"))  # the backend reads a tokenizer beside the weights
    lm = PlDpoLM(path=str(tmp_path / "base"), peft=str(tmp_path / "adapter"))
    batch = _tokens()
    np.testing.assert_allclose(_logits(lm.model, *batch), _logits(model, *batch), rtol=1e-5, atol=1e-5)


def test_int8_frozen_weights_train_the_adapters_and_merge_into_the_full_precision_weights():
    """QLoRA-style: the layers' kernels int8 while training (a quarter of their float32 bytes), the adapters
    trained on them put back on the full-precision start and merged there: start + scale * A @ B exactly."""
    mesh, rules = sharding.make_mesh(1, -1, 1), sharding.DEFAULT_DECODER_RULES
    start = lambda: sharding.create_sharded_module(lambda: create_model(CFG, seed=0), mesh, rules)  # noqa: E731
    model = start()
    kernel_sharding = model.layers.attn.q_proj.kernel[...].sharding
    config = lora.LoraConfig(rank=4, alpha=8.0, rslora=False, targets="_proj$", frozen_int8=True)
    lora.add_adapters(model, config, jax.random.key(0), sharding.placement(mesh, rules))
    lora.quantize_frozen(model)
    q_proj = model.layers.attn.q_proj.kernel[...]
    assert q_proj.q.dtype == jnp.int8 and q_proj.q.sharding == kernel_sharding  # quantized where it lies
    graphdef, state, losses = _train_adapters(model, mesh, rules, steps=4)
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.frozen))
    assert frozen_bytes < 0.5 * 4 * CFG.num_params()
    assert losses[-1] < losses[0]
    trained = nnx.merge(graphdef, state.params, state.frozen)
    merged = lora.merge(lora.put_on(start(), lora.adapters(trained)))
    a, b = (np.asarray(x, np.float64)[0] for x in lora.adapters(trained)["layers/attn/q_proj"][:2])
    want = np.asarray(start().layers.attn.q_proj.kernel[...], np.float64)[0] + config.scale * a @ b
    np.testing.assert_allclose(np.asarray(merged.layers.attn.q_proj.kernel[...])[0], want, rtol=1e-6, atol=1e-6)
