"""Decoder configuration and its translation from/to Hugging Face `config.json` (named shapes: `presets.py`).

One `DecoderConfig` describes every supported family (Hugging Face `model_type`):
  - "llama"   Llama 2 / 3 / 3.x (RoPE "default", "linear" or "llama3" scaling),
  - "mistral" (like llama, optional sliding window),
  - "qwen2"   Qwen2 / Qwen2.5 (bias on q/k/v, usually tied embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "dots", "offload_dots")
_ATTN_IMPLS = ("einsum", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture + numerics of a decoder-only transformer (Hugging Face Llama-family semantics)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # None or a dict as Hugging Face writes it, e.g. {"rope_type": "llama3", "factor": 32.0, ...}.
    # Stored as a tuple of items so that the config stays hashable (it is a static jit argument).
    rope_scaling: Any = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (qwen2: always; llama: q/k/v/o when set)
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    model_type: str = "llama"
    sliding_window: int | None = None  # mistral only; keys with q - k >= window are masked
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # "none" | "full" | "dots" (save only matmul outputs without batch dims) | "offload_dots" (the same
    # outputs, kept in host memory between the forward and the backward pass: TPU pinned host memory)
    remat: str = "none"
    # "einsum" | "xla" | "cudnn" (jax.nn.dot_product_attention) | "splash" (Pallas TPU kernel, models/splash.py)
    attention_impl: str = "einsum"

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"DecoderConfig.model_type={self.model_type!r}: supported are {SUPPORTED_MODEL_TYPES}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name, allowed in (
            ("param_dtype", _DTYPES),
            ("compute_dtype", _DTYPES),
            ("remat", _REMAT),
            ("attention_impl", _ATTN_IMPLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"DecoderConfig.rope_scaling rope_type={rope_type!r}: supported are {_SUPPORTED_ROPE_TYPES}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (int(self.eos_token_id),)

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d

    def num_layer_params(self) -> int:
        """The weights of the layers' projections (attention and MLP kernels): what `sample_int8` quantizes."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        return self.num_layers * (2 * d * q + 2 * d * kv + 3 * d * f)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face config.json <-> DecoderConfig.
def _require(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"{where}: required field {key!r} is missing")
    return hf[key]


def from_hf_config(hf: Mapping[str, Any], *, where: str = "config.json", **numerics) -> DecoderConfig:
    """Translates a Hugging Face config dict; `numerics` sets param_dtype/compute_dtype/remat/attention_impl."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type={model_type!r} (architectures={hf.get('architectures')}) is not "
            f"supported; supported model types are {SUPPORTED_MODEL_TYPES}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported for qwen2")
    hidden = int(_require(hf, "hidden_size", where))
    heads = int(_require(hf, "num_attention_heads", where))
    head_dim = hf.get("head_dim") or hidden // heads
    # transformers v5 writes `rope_parameters` (with rope_theta inside); older files write rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    if not rope and hf.get("rope_scaling"):
        rope = dict(hf["rope_scaling"])
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    if rope.get("rope_type", "default") == "default":
        rope = {}
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(_require(hf, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size", where)),
        num_layers=int(_require(hf, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(theta),
        rope_scaling=rope or None,
        rms_norm_eps=float(_require(hf, "rms_norm_eps", where)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(_require(hf, "max_position_embeddings", where)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        sliding_window=int(sliding) if sliding else None,
        **numerics,
    )


def to_hf_config(config: DecoderConfig) -> dict[str, Any]:
    """A config.json dict that transformers (v4 and v5) reads back to the same architecture."""
    rope = config.rope_scaling_dict
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        # Both spellings: v5 reads rope_parameters, v4 / vLLM read rope_theta + rope_scaling.
        "rope_theta": config.rope_theta,
        "rope_scaling": rope or None,
        "rope_parameters": {"rope_type": "default", **rope, "rope_theta": config.rope_theta},
        "torch_dtype": config.param_dtype,
        "dtype": config.param_dtype,
        "use_cache": True,
    }
    if config.model_type == "llama":
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = False
    if config.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
        hf["sliding_window"] = None
        hf["max_window_layers"] = config.num_layers
    return hf
