"""Parity with the real Hugging Face PyTorch implementations (transformers + CPU torch): logits, export, greedy."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from pl_dpo import sampler  # noqa: E402
from pl_dpo.models import create_model, from_pretrained, positions_from_valid, preset_config, save_pretrained  # noqa: E402

_COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}


def _hf_model(kind: str):
    torch.manual_seed({"llama": 0, "llama3": 1, "mistral": 2, "qwen2": 3}[kind])
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**_COMMON, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}, attention_bias=True)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**_COMMON, sliding_window=4)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF inits biases and norms to constants; randomise them so they are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "llama3", "mistral", "qwen2"])
def hf_folder(request, tmp_path_factory):
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, str(folder)


def _batch(pad_side: str):
    rng = np.random.default_rng(0)
    lengths = [12, 7, 1, 10]
    tokens = np.zeros((4, 12), np.int32)
    valid = np.zeros((4, 12), bool)
    for b, n in enumerate(lengths):
        sl = slice(12 - n, 12) if pad_side == "left" else slice(0, n)
        tokens[b, sl] = rng.integers(3, 160, n)
        valid[b, sl] = True
    return tokens, valid


def _hf_logits(model, tokens, valid):
    positions = np.asarray(positions_from_valid(jnp.asarray(valid)))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_logits_match_hf(hf_folder, pad_side):
    kind, hf_model, folder = hf_folder
    model = from_pretrained(folder)
    assert model.config.model_type == {"llama3": "llama"}.get(kind, kind)
    tokens, valid = _batch(pad_side)
    ours = np.asarray(
        model.logits(model(jnp.asarray(tokens), positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid)))
    )
    theirs = _hf_logits(hf_model, tokens, valid)
    assert np.abs(ours - theirs)[valid].max() <= 1e-4
    assert np.abs(theirs[valid]).max() > 0.1  # the comparison is not vacuous


def test_export_loads_in_hf_with_same_logits(hf_folder, tmp_path):
    _, _, folder = hf_folder
    model = from_pretrained(folder)
    save_pretrained(model, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens, valid = _batch("left")
    ours = np.asarray(
        model.logits(model(jnp.asarray(tokens), positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid)))
    )
    assert np.abs(ours - _hf_logits(reloaded, tokens, valid))[valid].max() <= 1e-4


def test_export_of_preset_with_llama3_rope_loads_in_hf(tmp_path):
    model = create_model(preset_config("tiny-llama3", num_layers=2), seed=0)
    save_pretrained(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    tokens, valid = _batch("right")
    ours = np.asarray(
        model.logits(model(jnp.asarray(tokens), positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid)))
    )
    assert np.abs(ours - _hf_logits(hf, tokens, valid))[valid].max() <= 1e-4


def test_greedy_matches_hf_generate(hf_folder):
    kind, hf_model, folder = hf_folder
    model = from_pretrained(folder)
    tokens, valid = _batch("left")
    cfg = sampler.SamplingConfig(max_new_tokens=32, greedy=True, eos_ids=(), pad_id=0)
    out = sampler.generate(model, tokens, valid, 0, cfg)
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=0,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT), hf_out[:, tokens.shape[1] :].numpy())
