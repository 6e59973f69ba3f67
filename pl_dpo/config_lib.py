"""The config boundary: checks, derived values and typed sections, all before anything compiles.

The config is an `ml_collections.ConfigDict` (configs/common.py:base() declares every field and its default).
Library code takes the frozen dataclasses built below instead: `run_settings` (pl_dpo.settings.RunSettings,
with the SFT and round PhaseSettings), `optimizer`, `loss`, `sampling`, `model_config`, `lora`. Only the stages
that create or restore models (selfplay.rounds / policies / run_data, the planner) still read a model, data or
assistant section. The plain-value helpers (`plain`, `lookup`, `apply_overrides`, `parse_flag_overrides`) live in
`pl_dpo.config_values` and are re-exported here: the workdir check, experiments/sweep.py and the tests use them.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from pl_dpo import losses, sampler, sharding
from pl_dpo.config_values import MISSING, apply_overrides, lookup, parse_flag_overrides, plain  # noqa: F401
from pl_dpo.data import TokenizeConfig
from pl_dpo.data.builders import check_options
from pl_dpo.models import DecoderConfig, create_model, peft_io, preset_config
from pl_dpo.models import lora as lora_lib
from pl_dpo.models.hf_io import ModelFolderError, read_hf_config
from pl_dpo.models.lora import LoraConfig, LoraError
from pl_dpo.selfplay import modes
from pl_dpo.settings import HarnessSettings, PhaseSettings, RunSettings
from pl_dpo.training import train
from pl_dpo.workdir import layout


class ConfigError(ValueError):
    """A config value out of range or inconsistent with another one."""


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
        T=float(section.T), variant=section.variant, top_m=section.top_m, sft_weight=float(section.sft_weight)
    )


def sampling(
    section: ml_collections.ConfigDict,
    *,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    int8: bool = False,
    num_ids: int = 0,
) -> sampler.SamplingConfig:
    """The sampling section as the sampler's SamplingConfig (EOS, padding and the number of ids come from the
    tokenizer; `int8`: the sampled model section's `sample_int8`)."""
    return sampler.SamplingConfig(
        max_new_tokens=section.max_new_tokens,
        temperature=section.temperature,
        top_k=section.top_k,
        top_p=section.top_p,
        eos_ids=tuple(eos_ids),
        pad_id=pad_id,
        int8=bool(int8),
        num_ids=num_ids,
    )


def used_as_shipped(assistant: ml_collections.ConfigDict) -> bool:
    """An assistant section whose model is sampled as its folder has it (no SFT, no PEFT adapter to merge): the
    run reads it straight into the sampler's layout (`decode_layout.ModelFolder`)."""
    return assistant.sft_steps == 0 and not init_adapter(assistant.model)


def sample_int8(model_cfg: ml_collections.ConfigDict) -> bool:
    return bool(model_cfg.sample_int8)


def sft_phase(section: ml_collections.ConfigDict) -> PhaseSettings:
    """config.sft, or an assistant's section (its own `sft_steps`; no early stopping)."""
    assistant = "sft_steps" in section
    return PhaseSettings(
        batch_size=section.batch_size,
        optim=optimizer(section.optim),
        steps=section.sft_steps if assistant else section.steps,
        epochs=1,  # SFT counts steps; epochs_for_steps derives the epochs that hold them
        max_steps=None,
        eval_every=0 if assistant else section.eval_every,
        patience=1 if assistant else section.patience,  # unread without eval_every
        lr_per_round=(),
    )


def eval_record(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"eval": ..., "max_new_tokens": ...} (the last part of each of `layout.EVAL_FIELDS` names it: the
    eval_<t>.json format). Without harness tasks the record leaves `eval.harness` out, as runs made before it
    existed recorded it: their evaluations stay fresh."""
    record = {field.rsplit(".", 1)[-1]: plain(lookup(c, field)) for field in layout.EVAL_FIELDS}
    if not harness(c.eval):
        record["eval"].pop("harness", None)
    return record


def harness(section: ml_collections.ConfigDict) -> HarnessSettings | None:
    """config.eval.harness as `HarnessSettings` (None: no tasks; configs/common.py has the meanings)."""
    h = section.harness
    tasks = tuple(t.strip() for t in str(h.tasks).split(",") if t.strip())
    if not tasks:
        return None
    return HarnessSettings(
        tasks=tasks,
        include_path=str(h.include_path) or None,
        num_fewshot=int(h.num_fewshot) if h.num_fewshot >= 0 else None,
        limit=int(h.limit) or None,
        batch_size=int(h.batch_size) or int(section.batch_size),
        apply_chat_template=bool(h.apply_chat_template),
        max_length=int(h.max_length) or None,
    )


def run_settings(config: ml_collections.ConfigDict) -> RunSettings:
    """The typed settings the stages of a run read (pl_dpo.settings); defaults live in configs/common.py:base()."""
    c, r = config, config.rounds
    return RunSettings(
        seed=int(c.seed),
        arms=tuple((mode, list_size(c, mode)) for mode in modes_of(c)),
        loss=loss(c.loss),
        tokenize=TokenizeConfig(max_prompt_len=c.data.max_prompt_len, max_response_len=c.data.max_response_len),
        max_truncated_fraction=float(c.data.max_truncated_fraction),
        pack_prompt=bool(c.data.pack_prompt),
        length_buckets=tuple(c.data.length_buckets) or None,
        logprob_chunk=int(c.logprob_chunk),
        eval_batch_size=int(c.eval.batch_size),
        eval_record=eval_record(c),
        harness=harness(c.eval),
        sampling_batch_size=int(c.sampling.batch_size),
        decode_tp=int(c.sampling.decode_tp) or None,
        save_every_steps=int(c.checkpoint.save_every_steps),
        keep_train_state=bool(c.checkpoint.keep_train_state),
        export_hf=bool(c.export_hf),
        sft=sft_phase(c.sft),
        rounds=PhaseSettings(
            batch_size=r.batch_size,
            optim=optimizer(r.optim),
            steps=0,  # rounds count epochs (and max_steps)
            epochs=r.epochs,
            max_steps=r.max_steps or None,
            eval_every=0,  # a round trains its epochs: no early stopping
            patience=1,  # unread without eval_every
            lr_per_round=tuple(float(lr) for lr in r.lr_per_round),
        ),
        num_rounds=int(r.num),
        prompts_per_round=int(r.prompts_per_round),
        mix_previous=int(r.mix_previous),
        mix_rescore=bool(r.mix_rescore),
        answer_on_top=bool(r.answer_on_top),
    )


def foreign_tokenizer(assistant: ml_collections.ConfigDict) -> str:
    """An assistant's own tokenizer folder, or "" when it shares the policy's (configs/asft.py sets the field;
    assistant sections of configs/common.py:assistant() have none)."""
    return assistant.get("tokenizer_path") or ""


def check_vocab(config: ml_collections.ConfigDict, tokenizer_size: int) -> None:
    """Every model the run trains must have an embedding row for every id of the tokenizer."""
    sections = [("model", config.model)]
    sections += [
        (f"assistants[{i}].model", a.model) for i, a in enumerate(config.assistants) if not foreign_tokenizer(a)
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
        try:
            return read_hf_config(model_cfg.hf_path, **numerics)
        except ModelFolderError as e:
            raise ConfigError(f"config.model.hf_path={model_cfg.hf_path!r}: {e}") from None
    overrides = dict(model_cfg.get("overrides", {}) or {})
    overrides.setdefault("vocab_size", vocab_size)
    return preset_config(model_cfg.preset, **{**overrides, **numerics})


def lora(model_cfg: ml_collections.ConfigDict, where: str = "model") -> LoraConfig | None:
    """A model section's LoRA (configs/common.py:lora) as a LoraConfig; None when off."""
    section = model_cfg.lora
    if not section.enabled:
        return None
    try:
        return LoraConfig(
            rank=section.rank,
            alpha=section.alpha,
            rslora=bool(section.rslora),
            targets=section.targets,
            frozen_int8=bool(section.frozen_int8),
        )
    except LoraError as e:
        raise ConfigError(f"config.{where}.lora.{e}") from None


def init_adapter(model_cfg: ml_collections.ConfigDict) -> str:
    """The PEFT folder a model's LoRA starts from ("": none, or LoRA off)."""
    return model_cfg.lora.init_adapter if model_cfg.lora.enabled else ""


def check_lora(model_cfg: ml_collections.ConfigDict, where: str, vocab_size: int) -> None:
    """LoRA's settings against the model's projections (on an abstract model: nothing allocated), and the
    PEFT folder it starts from against the model's shapes."""
    settings = lora(model_cfg, where)
    if settings is None:
        return
    model = nnx.eval_shape(lambda: create_model(model_config(model_cfg, vocab_size), seed=0))
    try:
        lora_lib.targets(model, settings)
        if start := init_adapter(model_cfg):
            peft_io.load_peft_adapter(model, start)
    except LoraError as e:
        raise ConfigError(f"config.{where}.lora: {e}") from None


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Every check that can be made from the config alone, for a mesh over `num_devices` devices (default: this
    host's, at most config.mesh.num_devices, as the run builds it; the planner passes the slice's chips)."""
    arms = modes_of(config)
    for mode in arms:
        list_size(config, mode)
    if config.loss.K and config.loss.K < 2:
        raise ConfigError(f"config.loss.K={config.loss.K} must be >= 2 (or 0: from the mode)")
    if not config.loss.T > 0:
        raise ConfigError(f"config.loss.T={config.loss.T} must be > 0")
    if not config.loss.sft_weight >= 0:
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
    if config.sft.eval_every < 0 or config.sft.patience < 1:
        raise ConfigError(
            f"config.sft.eval_every={config.sft.eval_every} must be >= 0 and sft.patience={config.sft.patience} >= 1"
        )
    if config.rounds.prompts_per_round < 0:
        raise ConfigError(f"config.rounds.prompts_per_round={config.rounds.prompts_per_round} must be >= 0 (0: all)")
    if config.rounds.mix_previous < 0:
        raise ConfigError(f"config.rounds.mix_previous={config.rounds.mix_previous} must be >= 0")
    lrs = config.rounds.lr_per_round
    if lrs and len(lrs) < config.rounds.num:
        raise ConfigError(f"config.rounds.lr_per_round has {len(lrs)} values for {config.rounds.num} rounds")
    if lrs and not all(lr > 0 for lr in lrs):
        raise ConfigError(f"config.rounds.lr_per_round={list(lrs)} must all be > 0")
    phases = {"sft": config.sft, "rounds": config.rounds}
    phases |= {f"assistants[{i}]": a for i, a in enumerate(config.assistants)}
    for where, section in phases.items():
        try:  # the optimizer's own checks, for every phase
            optimizer(section.optim)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.{where}.optim.{e}") from None
    s = config.sampling
    try:  # the sampler's own checks, before SFT has trained
        sampling(s)
    except ValueError as e:
        raise ConfigError(str(e).replace("SamplingConfig.", "config.sampling.")) from None
    if s.decode_tp < 0:
        raise ConfigError(f"config.sampling.decode_tp={s.decode_tp} must be >= 0 (0: the sampler's rule)")
    if not 0 < config.data.max_truncated_fraction <= 1:
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
    try:  # the source's own checks of its options, before any data is read
        check_options(config.data.source, dict(plain(config.data.options)))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.data.options: {e}") from None
    harness_settings = harness(config.eval)
    if harness_settings is not None:  # lm-eval and its tasks: the harness's own checks (pl_dpo.harness.run)
        from pl_dpo.harness.run import check

        check(harness_settings)
    m = config.mesh
    if num_devices is None and m.num_devices > len(jax.devices()):
        raise ConfigError(f"config.mesh.num_devices={m.num_devices}, but there are {len(jax.devices())} devices")
    try:
        n = num_devices or len(jax.devices()[: m.num_devices or None])
        data, fsdp, _ = sharding.mesh_shape(m.data, m.fsdp, m.tensor, n)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    batch_shards = data * fsdp
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
        if assistant.sft_steps < 1 and not assistant.model.hf_path:
            raise ConfigError(f"config.assistants[{i}] needs sft_steps >= 1 or a model.hf_path")
        if foreign_tokenizer(assistant) and (assistant.sft_steps > 0 or not assistant.model.hf_path):
            raise ConfigError(
                f"config.assistants[{i}] has its own tokenizer: it must be a pretrained "
                "model.hf_path used as is (sft_steps=0)"
            )
    sections = [("model", config.model)] + [
        (f"assistants[{i}].model", a.model) for i, a in enumerate(config.assistants)
    ]
    for where, section in sections:
        check_lora(section, where, config.tokenizer.vocab_size)
    for where, section in (s for s in sections if s[1].hf_path):
        try:  # its config.json read now: a folder pl_dpo cannot load is named before any work
            model_config(section, vocab_size=0)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config.model.", f"config.{where}.", 1)) from None
