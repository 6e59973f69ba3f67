"""Config checks and derived values, all done before anything compiles (DESIGN.md §8).

The config is an `ml_collections.ConfigDict` (see configs/demo.py for every field).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from pl_dpo.losses import VARIANTS
from pl_dpo.models import DecoderConfig, from_hf_config, tiny_config

# "sft" is the control arm: the same rounds and gradient steps, spent on more SFT epochs.
MODES = ("spin", "asft", "ladder", "offline", "sft")
# Keys that must not change between runs on one workdir (the saved work depends on them).
WORKDIR_KEYS = (
    "seed",
    "modes",
    "model",
    "tokenizer",
    "data",
    "assistants",
    "loss",
    "sft",
    "rounds.epochs",
    "rounds.batch_size",
    "sampling",
)


class ConfigError(ValueError):
    """A config value out of range or inconsistent with another one."""


def modes_of(config: ml_collections.ConfigDict) -> list[str]:
    modes = [m.strip() for m in str(config.modes).split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ConfigError(f"config.modes={config.modes!r}: unknown {unknown}; choose from {MODES}")
    return modes


def list_size(config: ml_collections.ConfigDict, mode: str) -> int:
    """K of a mode: spin 2, asft 3, ladder 2 + #assistants, offline config.loss.K (sft: 1)."""
    if mode == "sft":
        return 1
    n_assist = len(config.assistants)
    derived = {"spin": 2, "asft": 3, "ladder": 2 + n_assist, "offline": config.loss.K}[mode]
    k = config.loss.K
    if mode == "asft" and n_assist < 1:
        raise ConfigError("mode 'asft' needs one assistant model (config.assistants)")
    if mode == "ladder" and n_assist < 1:
        raise ConfigError("mode 'ladder' needs at least one assistant model (config.assistants)")
    # loss.K sizes the offline lists; with no offline arm it must agree with every self-play mode.
    offline_arm = "offline" in modes_of(config)
    if k and k != derived and mode != "offline" and not offline_arm:
        raise ConfigError(
            f"config.loss.K={k} does not fit mode {mode!r}, which ranks K={derived} responses "
            f"(spin: K=2, asft: K=3, ladder: 2 + number of assistants)"
        )
    if not derived or derived < 2:
        raise ConfigError(f"mode {mode!r} needs config.loss.K >= 2, got {derived}")
    return int(derived)


def model_config(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> DecoderConfig:
    """The decoder of a model section: a Hugging Face folder's config.json when `hf_path`
    is set (numerics from the section), else a named preset with overrides."""
    numerics = {
        key: model_cfg[key] for key in ("param_dtype", "compute_dtype", "remat", "attention_impl") if model_cfg.get(key)
    }
    if model_cfg.get("hf_path"):
        cfg_file = os.path.join(model_cfg.hf_path, "config.json")
        if not os.path.exists(cfg_file):
            raise ConfigError(f"config.model.hf_path={model_cfg.hf_path!r}: {cfg_file} does not exist")
        with open(cfg_file, encoding="utf-8") as f:
            return from_hf_config(json.load(f), where=cfg_file, **numerics)
    overrides = dict(model_cfg.get("overrides", {}) or {})
    overrides.setdefault("vocab_size", vocab_size)
    return tiny_config(model_cfg.preset, **{**overrides, **numerics})


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that can be made from the config alone."""
    modes = modes_of(config)
    for mode in modes:
        list_size(config, mode)
    if config.loss.K and config.loss.K < 2:
        raise ConfigError(f"config.loss.K={config.loss.K} must be >= 2 (or 0: from the mode)")
    if not config.loss.T > 0:
        raise ConfigError(f"config.loss.T={config.loss.T} must be > 0")
    if config.loss.variant not in VARIANTS:
        raise ConfigError(f"config.loss.variant={config.loss.variant!r}; valid variants: {', '.join(VARIANTS)}")
    if config.loss.variant == "hinge" and any(list_size(config, m) != 2 for m in modes if m != "sft"):
        raise ConfigError("config.loss.variant='hinge' is defined for K=2 only")
    if config.rounds.num < 1 or config.rounds.epochs < 1:
        raise ConfigError(
            f"config.rounds.num={config.rounds.num} and rounds.epochs={config.rounds.epochs} must be >= 1"
        )
    lrs = config.rounds.get("lr_per_round")
    if lrs and len(lrs) < config.rounds.num:
        raise ConfigError(f"config.rounds.lr_per_round has {len(lrs)} values for {config.rounds.num} rounds")
    if config.sampling.max_new_tokens > config.data.max_response_len:
        raise ConfigError(
            f"config.sampling.max_new_tokens={config.sampling.max_new_tokens} exceeds "
            f"config.data.max_response_len={config.data.max_response_len}"
        )
    if "offline" in modes and config.data.source == "synthetic":
        raise ConfigError(
            "mode 'offline' needs ranked lists from data (ultrafeedback / ranked_jsonl), "
            "not the synthetic source (one answer per prompt)"
        )
    num_devices = config.mesh.get("num_devices", 0) or jax.device_count()
    fsdp = config.mesh.fsdp if config.mesh.fsdp > 0 else num_devices // max(config.mesh.data * config.mesh.tensor, 1)
    batch_shards = max(config.mesh.data * fsdp, 1)
    for name in ("sft.batch_size", "rounds.batch_size", "sampling.batch_size", "eval.batch_size"):
        section, field = name.split(".")
        value = config[section][field]
        if value < 1 or value % jax.process_count():
            raise ConfigError(
                f"config.{name}={value} must be >= 1 and divisible by the process count {jax.process_count()}"
            )
        if name in ("sft.batch_size", "rounds.batch_size") and value % batch_shards:
            raise ConfigError(f"config.{name}={value} must be divisible by mesh data*fsdp={batch_shards}")
    for i, assistant in enumerate(config.assistants):
        if assistant.sft_steps < 1 and not assistant.model.get("hf_path"):
            raise ConfigError(f"config.assistants[{i}] needs sft_steps >= 1 or a model.hf_path")
        if assistant.get("tokenizer_path") and (assistant.sft_steps > 0 or not assistant.model.get("hf_path")):
            raise ConfigError(
                f"config.assistants[{i}] has its own tokenizer: it must be a pretrained "
                "model.hf_path used as is (sft_steps=0)"
            )
