"""Flax NNX decoder for the Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5) with Hugging Face import/export.

See `decoder.py` for the parameter paths (layers stacked on a leading axis, scanned)."""

from pl_dpo.models.config import DecoderConfig, from_hf_config, to_hf_config
from pl_dpo.models.decoder import Decoder, KVCache, create_model, positions_from_valid
from pl_dpo.models.hf_io import from_pretrained, save_pretrained
from pl_dpo.models.presets import preset_config, preset_names

__all__ = [
    "DecoderConfig",
    "Decoder",
    "KVCache",
    "create_model",
    "from_hf_config",
    "from_pretrained",
    "positions_from_valid",
    "preset_names",
    "save_pretrained",
    "preset_config",
    "to_hf_config",
]
