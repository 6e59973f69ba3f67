"""Named decoder shapes: `preset_config("tiny-llama", vocab_size=300)`.

The tiny ones are built from scratch (random init) for tests and the demo; "llama-3.2-1b" is the shape of
meta-llama/Llama-3.2-1B (1.24B parameters) for benchmarks, without its weights. The published models' shapes
(their config.json) let the planner plan them without the weights."""

from __future__ import annotations

import dataclasses
from typing import Any

from pl_dpo.models.config import DecoderConfig

_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny-llama3": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={**_LLAMA3_SCALING, "factor": 8.0, "original_max_position_embeddings": 256},
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny-mistral": dict(
        model_type="mistral",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=1000000.0,
        attention_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # Shapes of published models (their config.json), for planning without the weights (pl_dpo.plan). A preset of
    # this size builds a randomly initialised model: training one means loading the real folder (model.hf_path).
    "mistral-7b": dict(  # Mistral-7B-v0.1, and zephyr-7b-sft-full (the SPIN paper's model) fine-tuned from it
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=10000.0,
        sliding_window=4096,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-2-7b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-2-13b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        attention_bias=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        eos_token_id=151643,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_SCALING, "factor": 8.0},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-70b": dict(  # the assistant of configs/asft.py (Llama-3.1-70B-Instruct)
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_SCALING, "factor": 8.0},
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    ),
}


def preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def preset_config(name: str, **overrides) -> DecoderConfig:
    """A named preset (see `preset_names()`), with any field overridden, e.g. `preset_config("tiny-llama", vocab_size=300)`."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"preset_config({name!r}): unknown DecoderConfig fields {sorted(unknown)}")
    return DecoderConfig(**{**_PRESETS[name], **overrides})
