"""The config boundary: checks, derived values and typed sections, all before anything compiles.

The config is an `ml_collections.ConfigDict` (configs/common.py:base() declares every field).
It stops here and at the round loop: library code takes the small frozen dataclasses built
below (`optimizer`, `loss`, `model_config`). The same `plain` / `lookup` / `apply_overrides`
serve the workdir check, experiments/sweep.py and the tests.
"""

from __future__ import annotations

import ast
import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from pl_dpo import losses, sampler
from pl_dpo.models import DecoderConfig, from_hf_config, preset_config
from pl_dpo.selfplay import modes
from pl_dpo.training import train
from pl_dpo.workdir import layout as workdir_lib

# Keys that must not change between runs on one workdir: every stage's (workdir.STAGE_FIELDS).
# Not there: rounds.num (more rounds continue a run), eval.* (a change re-evaluates), mesh,
# checkpoint, export_hf.
WORKDIR_KEYS = workdir_lib.identity_fields()


class ConfigError(ValueError):
    """A config value out of range or inconsistent with another one."""


class WorkdirConfigMismatch(ValueError):
    """A workdir's saved work was made under another value of a key that must not change."""


# ----------------------------------------------------------------------------- plain values


def plain(value: Any) -> Any:
    """ConfigDicts (also inside lists, which `to_dict()` leaves alone) as plain dicts and lists."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


MISSING = "<missing>"
INPUTS_KEY = "_inputs"  # config.json: {config field: {file: fingerprint}} (workdir.input_fingerprints)


def lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key (`loss.K`) of a config or plain dict; MISSING if absent."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
            return MISSING
        node = node[part]
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted fields set (what `--config.a.b=v` does), checking each exists."""
    config = copy.deepcopy(config)  # to_dict() would share the ConfigDicts inside lists (assistants)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise KeyError(f"override {key!r}: the config has no field {p!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {key!r}: the config has no field {leaf!r}")
        node[leaf] = value
    return config


def parse_flag_overrides(config: ml_collections.ConfigDict, flags: Sequence[str]) -> dict[str, Any]:
    """`["--config.rounds.num=2", ...]` as {dotted key: value}, each value parsed like the field's
    current value (as ml_collections' config flags do: ints, floats, bools, tuples, strings)."""
    out = {}
    for flag in flags:
        key, eq, text = flag.removeprefix("--config.").partition("=")
        current = lookup(config, key)
        if not eq or current is MISSING:
            raise KeyError(f"{flag!r}: expected --config.<existing field>=<value>")
        if isinstance(current, str):
            out[key] = text
        elif isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(f"{flag!r}: expected True or False")
            out[key] = text.lower() == "true"
        else:
            value = ast.literal_eval(text)
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            elif isinstance(current, int) and not isinstance(value, int):
                raise ValueError(f"{flag!r}: expected an integer")
            out[key] = value
    return out


def _parent(tree: Any, dotted: str) -> tuple[dict | None, str]:
    """The dict holding the last part of `dotted` in a JSON tree (None: a part on the way is missing), and that part."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return (tree if isinstance(tree, dict) else None), leaf


def _without_numerics(value: Any, key: str) -> Any:
    """`value` (found at dotted `key`) without the NUMERICS_FIELDS below it: a resumed run may change those."""
    if not isinstance(value, dict):
        return value
    value = copy.deepcopy(value)
    for field in workdir_lib.NUMERICS_FIELDS:
        if field.startswith(key + "."):
            node, leaf = _parent(value, field[len(key) + 1 :])
            if node is not None:
                node.pop(leaf, None)
    return value


def check_workdir_config(
    workdir: str | os.PathLike, config: Mapping[str, Any], keys_that_must_match: Sequence[str]
) -> None:
    """Write `workdir/config.json` on the first run; later runs must agree on the given keys.

    Keys may be dotted (`loss.K`). Values are compared after a JSON round trip, so a
    tuple and a list with the same items match. Raises WorkdirConfigMismatch naming
    the key, the old and the new value.
    """
    new = json.loads(json.dumps(plain(config), default=str, sort_keys=True))
    if isinstance(config, ml_collections.ConfigDict):  # the files it names, by content
        new[INPUTS_KEY] = workdir_lib.input_fingerprints(config)
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            workdir_lib.atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True))
        return
    old = json.loads(path.read_text())
    for field, value in workdir_lib.FIELDS_ADDED_LATER.items():  # what an older config.json ran with
        node, leaf = _parent(old, field)
        if node is not None:
            node.setdefault(leaf, value)
    for key in keys_that_must_match:
        a, b = _without_numerics(lookup(old, key), key), _without_numerics(lookup(new, key), key)
        if a != b:
            field, was, now = _first_difference(a, b, key)
            raise WorkdirConfigMismatch(
                f"workdir {workdir} was written by an incompatible config: {field!r} was {was!r}, now {now!r}, "
                f"and the saved work of {_stages_of(field)} depends on it (see {path}); use a new --workdir or "
                "restore the old value"
            )
    for field, files in (old.get(INPUTS_KEY) or {}).items():
        now = new.get(INPUTS_KEY, {}).get(field, {})
        for file in sorted(set(files) | set(now)):
            if files.get(file) != now.get(file):
                state = "is gone" if file not in now else "is new" if file not in files else "changed"
                raise WorkdirConfigMismatch(
                    f"workdir {workdir}: {file} (config.{field}) {state} since the workdir's saved work "
                    f"({_stages_of(field)}) was made from it; use a new --workdir, or the file as it was"
                )


def _first_difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any]:
    """The first dotted field under `key` where two JSON values differ, with its two values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                return _first_difference(old.get(name), new.get(name), f"{key}.{name}")
    return key, old, new


def _stages_of(field: str) -> str:
    """The stages (workdir.STAGE_FIELDS) whose output depends on `field`, e.g. "the sft and rounds stages"."""
    names = [
        stage
        for stage, fields in workdir_lib.STAGE_FIELDS.items()
        if any(field == f or field.startswith(f + ".") or f.startswith(field + ".") for f in fields)
    ]
    if not names:
        return "every stage"
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"the {listed} stage{'s' if len(names) > 1 else ''}"


# ----------------------------------------------------------------------------- modes


def modes_of(config: ml_collections.ConfigDict) -> list[modes.Mode]:
    names = [m.strip() for m in str(config.modes).split(",") if m.strip()]
    unknown = [m for m in names if m not in modes.MODES]
    if not names or unknown:
        raise ConfigError(f"config.modes={config.modes!r}: unknown {unknown}; choose from {tuple(modes.MODES)}")
    return [modes.MODES[m] for m in names]


def list_size(config: ml_collections.ConfigDict, mode: str | modes.Mode) -> int:
    """K of a mode (modes.MODES): spin 2, asft 3, ladder 2 + #assistants, offline config.loss.K (sft: 1)."""
    mode = modes.get(mode) if isinstance(mode, str) else mode
    n_assist, k = len(config.assistants), config.loss.K
    derived = mode.list_size(n_assist, k)
    if n_assist < mode.min_assistants:
        need = "one assistant model" if mode.min_assistants == 1 else f"{mode.min_assistants} assistant models"
        raise ConfigError(f"mode {mode.name!r} needs {need} (config.assistants)")
    if mode.objective is modes.Objective.SFT:
        return derived
    # loss.K sizes the offline lists; with no such arm it must agree with every self-play mode.
    if k and k != derived and not any(m.k_from_config for m in (mode, *modes_of(config))):
        rules = ", ".join(f"{m.name}: {m.k_rule}" for m in modes.MODES.values() if m.objective is mode.objective)
        raise ConfigError(
            f"config.loss.K={k} does not fit mode {mode.name!r}, which ranks K={derived} responses ({rules})"
        )
    if not derived or derived < 2:
        raise ConfigError(f"mode {mode.name!r} needs config.loss.K >= 2, got {derived}")
    return int(derived)


# ----------------------------------------------------------------------------- typed sections


def optimizer(section: ml_collections.ConfigDict) -> train.OptimizerConfig:
    """An optimizer section (configs/common.py:optimizer) as the step's OptimizerConfig."""
    return train.OptimizerConfig(**plain(section))


def loss(section: ml_collections.ConfigDict) -> losses.LossConfig:
    return losses.LossConfig(
        T=float(section.T),
        variant=section.variant,
        top_m=section.get("top_m"),
        sft_weight=float(section.get("sft_weight", 0.0)),
    )


def check_vocab(config: ml_collections.ConfigDict, tokenizer_size: int) -> None:
    """Every model the run trains must have an embedding row for every id of the tokenizer."""
    sections = [("model", config.model)]
    sections += [
        (f"assistants[{i}].model", a.model) for i, a in enumerate(config.assistants) if not a.get("tokenizer_path")
    ]
    for name, section in sections:
        vocab = model_config(section, tokenizer_size).vocab_size
        if vocab < tokenizer_size:
            raise ConfigError(
                f"config.{name}: vocab_size={vocab} is smaller than the tokenizer's {tokenizer_size} ids "
                "(ids past the embedding table would train on garbage)"
            )


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
    return preset_config(model_cfg.preset, **{**overrides, **numerics})


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check that can be made from the config alone."""
    arms = modes_of(config)
    for mode in arms:
        list_size(config, mode)
    if config.loss.K and config.loss.K < 2:
        raise ConfigError(f"config.loss.K={config.loss.K} must be >= 2 (or 0: from the mode)")
    if not config.loss.T > 0:
        raise ConfigError(f"config.loss.T={config.loss.T} must be > 0")
    if not config.loss.get("sft_weight", 0.0) >= 0:
        raise ConfigError(f"config.loss.sft_weight={config.loss.sft_weight} must be >= 0")
    if config.loss.variant not in losses.VARIANTS:
        raise ConfigError(f"config.loss.variant={config.loss.variant!r}; valid variants: {', '.join(losses.VARIANTS)}")
    ranking = [m for m in arms if m.objective is modes.Objective.PL_DPO]
    if config.loss.variant == "hinge" and any(list_size(config, m) != 2 for m in ranking):
        raise ConfigError("config.loss.variant='hinge' is defined for K=2 only")
    if config.rounds.num < 1 or config.rounds.epochs < 1:
        raise ConfigError(
            f"config.rounds.num={config.rounds.num} and rounds.epochs={config.rounds.epochs} must be >= 1"
        )
    if config.sft.get("eval_every", 0) < 0 or config.sft.get("patience", 1) < 1:
        raise ConfigError(
            f"config.sft.eval_every={config.sft.eval_every} must be >= 0 and sft.patience={config.sft.patience} >= 1"
        )
    if config.rounds.get("prompts_per_round", 0) < 0:
        raise ConfigError(f"config.rounds.prompts_per_round={config.rounds.prompts_per_round} must be >= 0 (0: all)")
    if config.rounds.get("mix_previous", 0) < 0:
        raise ConfigError(f"config.rounds.mix_previous={config.rounds.mix_previous} must be >= 0")
    lrs = config.rounds.get("lr_per_round")
    if lrs and len(lrs) < config.rounds.num:
        raise ConfigError(f"config.rounds.lr_per_round has {len(lrs)} values for {config.rounds.num} rounds")
    s = config.sampling
    try:  # the sampler's own checks, before SFT has trained
        sampler.SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    except ValueError as e:
        raise ConfigError(str(e).replace("SamplingConfig.", "config.sampling.")) from None
    if s.get("decode_tp", 0) < 0:
        raise ConfigError(f"config.sampling.decode_tp={s.decode_tp} must be >= 0 (0: the sampler's rule)")
    if not 0 < config.data.get("max_truncated_fraction", 0.5) <= 1:
        raise ConfigError(f"config.data.max_truncated_fraction={config.data.max_truncated_fraction} must be in (0, 1]")
    if config.sampling.max_new_tokens > config.data.max_response_len:
        raise ConfigError(
            f"config.sampling.max_new_tokens={config.sampling.max_new_tokens} exceeds "
            f"config.data.max_response_len={config.data.max_response_len}"
        )
    needs_verifier = [m.name for m in arms if m.needs_verifier]
    if needs_verifier and config.data.source != "synthetic":
        raise ConfigError(
            f"mode {needs_verifier[0]!r} ranks samples with the task's verifier, which only "
            f"data.source='synthetic' has (got {config.data.source!r})"
        )
    needs_ranked_data = [m.name for m in arms if m.ranks_dataset_responses]
    if needs_ranked_data and config.data.source == "synthetic":
        raise ConfigError(
            f"mode {needs_ranked_data[0]!r} needs ranked lists from data (ultrafeedback / ranked_jsonl), "
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
