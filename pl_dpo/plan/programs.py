"""The programs of a run: each one the planner compiles, at the largest shapes the run gives it.

`programs_of` reads the config through the typed settings the run itself reads (`config_lib.run_settings`,
`config_lib.sampling`, `config_lib.model_config`), so the plan follows what runs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from pl_dpo import config_lib, sampler
from pl_dpo.data import PackedBatch, default_buckets
from pl_dpo.harness.requests import MAX_GEN_TOKS, bucket_length
from pl_dpo.models import DecoderConfig, preset_config
from pl_dpo.models.lora import LoraConfig
from pl_dpo.selfplay import modes
from pl_dpo.settings import RunSettings


@dataclasses.dataclass
class Program:
    """One program of a run, at the shapes the config gives it."""

    name: str
    kind: str  # "train" | "score" | "sample"
    model: Any  # DecoderConfig
    batch: int
    # train / score: K responses per list and the model's row length; sample: prompt length and new tokens.
    k: int = 1
    length: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    packed: bool = False  # train / score: PackedBatch rows (data.pack_prompt), else RankedBatch
    harness: bool = False  # score: lm-eval requests (`harness.requests`: token rows of `length`), not ranked lists
    optim: Any = None  # train.OptimizerConfig
    objective: str = "pl_dpo"  # "pl_dpo" | "sft"
    # The config fields this program's batch comes from (for advice), e.g. "rounds.batch_size".
    batch_field: str = ""
    accum_field: str = ""
    decode_tp: int = 0  # sample: config.sampling.decode_tp (0: decode_layout.decode_tp_split's rule)
    # sample: the SamplingConfig it decodes with (None: plain sampling of `new_tokens`, no stop token).
    sampling: sampler.SamplingConfig | None = None
    # train: LoRA (config.model.lora) -- adapters train, the rest is a frozen input of the step.
    lora: LoraConfig | None = None
    # sample: an assistant used as shipped, read from its folder straight into the decode layout
    # (`decode_layout.ModelFolder`): its decode weights are the program's only copy.
    from_folder: bool = False


def settings_text(p: Program) -> str:
    """The program's setting as a plan row names it, e.g. "batch 64, K=2, L=1024 plain, remat full"."""
    remat = p.model.remat
    if p.kind == "sample":
        int8 = ", int8 weights" if p.sampling is not None and p.sampling.int8 else ""
        return f"batch {p.batch}, prompt {p.prompt_len} + {p.new_tokens} new{int8}"
    if p.harness:
        return f"batch {p.batch}, rows of {p.length} tokens"
    layout = "packed" if p.packed else "plain"
    accum = p.optim.grad_accum_steps if p.optim is not None and p.optim.grad_accum_steps > 1 else 1
    acc = f" x{accum} accum" if accum > 1 else ""
    adapters = f", LoRA r={p.lora.rank}" if p.kind == "train" and p.lora is not None else ""
    adapters += " on int8" if adapters and p.lora.frozen_int8 else ""
    return f"batch {p.batch}{acc}, K={p.k}, L={p.length} {layout}, remat {remat}{adapters}"


def model_of(section, vocab_size: int, notes: list[str], where: str) -> DecoderConfig:
    """The decoder shape of a model section (`config_lib.model_config`): the folder's config.json when it is
    there, else the section's preset, and a note that says so."""
    path, preset = section.hf_path, section.preset
    if path and os.path.exists(os.path.join(path, "config.json")):
        return config_lib.model_config(section, vocab_size)
    if path:
        notes.append(f"{where}: model folder {path!r} not found here; planning with the shape preset {preset!r}")
    elif not preset.startswith("tiny"):
        notes.append(f"{where}: no model folder given; planning with the shape preset {preset!r}")
    shape = copy.deepcopy(section)
    shape.hf_path = ""
    # A tiny preset is sized by the run's own tokenizer, built at run time: planned at vocab_size. A named
    # model keeps its preset's vocabulary (unless the section's overrides set one).
    vocab = vocab_size if preset.startswith("tiny") else preset_config(preset).vocab_size
    return config_lib.model_config(shape, vocab)


def longest_row(settings: RunSettings) -> int:
    """L of the largest plain batch: the longest of the length buckets as `data.BatchIterator` takes them (the
    configured ones, else powers of two, capped at the arrays' L = `RunSettings.seq_len`)."""
    return min(max(settings.length_buckets or default_buckets(settings.seq_len)), settings.seq_len)


def programs_of(config, notes: list[str]) -> list[Program]:
    """Every program a run of `config` compiles, at its largest shapes."""
    s = config_lib.run_settings(config)
    prompt = s.tokenize.max_prompt_len
    # Every train / score program's row shape.
    rows = {"length": longest_row(s), "prompt_len": prompt, "packed": s.batch_type is PackedBatch}
    # The tokenizer is built at run time: a tiny model is planned at its overrides' vocabulary, else 512.
    vocab = int(config.model.overrides.get("vocab_size", 0) or 512)
    policy = model_of(config.model, vocab, notes, "config.model")
    out: list[Program] = []
    if s.sft.steps > 0:
        out.append(
            Program(
                "sft step",
                "train",
                policy,
                s.sft.batch_size,
                k=1,
                optim=s.sft.optim,
                objective="sft",
                lora=config_lib.lora(config.model),
                **rows,
                batch_field="sft.batch_size",
                accum_field="sft.optim.grad_accum_steps",
            )
        )
    ks = sorted({k for mode, k in s.arms if mode.objective is modes.Objective.PL_DPO})
    for k in ks:
        out.append(
            Program(
                f"pl-dpo step K={k}",
                "train",
                policy,
                s.rounds.batch_size,
                k=k,
                optim=s.rounds.optim,
                lora=config_lib.lora(config.model),
                **rows,
                batch_field="rounds.batch_size",
                accum_field="rounds.optim.grad_accum_steps",
            )
        )
    for k in ks or [1]:
        out.append(
            Program(f"scoring K={k}", "score", policy, s.eval_batch_size, k=k, **rows, batch_field="eval.batch_size")
        )

    def sample(
        name: str, model, batch: int, field: str, sampling: sampler.SamplingConfig, tp: int, prompt_len: int = prompt
    ) -> Program:
        """A sampler program at the shapes `sampler.generate` compiles for (its padded batch and prompt bucket)."""
        batch, prompt_len = sampler.bucket_shapes(batch, prompt_len, sampling)
        return Program(
            name,
            "sample",
            model,
            batch,
            prompt_len=prompt_len,
            new_tokens=sampling.max_new_tokens,
            batch_field=field,
            decode_tp=tp,
            sampling=sampling,
        )

    # The stop token and padding come from the tokenizer at run time: id 0 stands in for both.
    sampling = config_lib.sampling(config.sampling, eos_ids=(0,), pad_id=0)
    # sampling.decode_tp sets the sampler's tensor-parallel group (evaluation always takes the rule's).
    tp = s.decode_tp or 0
    own = dataclasses.replace(sampling, int8=config_lib.sample_int8(config.model))
    out.append(sample("sampler", policy, s.sampling_batch_size, "sampling.batch_size", own, tp))
    # Evaluation planned from above: max_response_len new tokens, sampled (the run's `evaluate_policy` decodes
    # greedily up to sampling.max_new_tokens <= max_response_len: a smaller cache, no sampling temporaries).
    evaluation = dataclasses.replace(sampling, max_new_tokens=s.tokenize.max_response_len)
    out.append(sample("evaluation (greedy)", policy, s.eval_batch_size, "eval.batch_size", evaluation, 0))
    if s.harness is not None:  # config.eval.harness on every policy: its longest rows and generations
        length = s.harness.max_length or policy.max_position_embeddings
        h_batch, field = s.harness.batch_size, "eval.harness.batch_size"
        out.append(
            Program("harness log-likelihood", "score", policy, h_batch, length=bucket_length(length), harness=True,
                    batch_field=field)
        )  # fmt: skip
        new = min(MAX_GEN_TOKS, length // 2)
        greedy = dataclasses.replace(sampling, max_new_tokens=new, greedy=True)
        out.append(sample("harness generation (greedy)", policy, h_batch, field, greedy, 0, prompt_len=length - new))
    # The assistants whose samples some arm ranks (the first ones; ladder: every one of them).
    ranked = max((mode.assistants_ranked(k) for mode, k in s.arms), default=0)
    for i, a in enumerate(config.assistants[:ranked]):
        assistant = model_of(a.model, vocab, notes, f"config.assistants[{i}].model")
        theirs = dataclasses.replace(sampling, int8=config_lib.sample_int8(a.model))
        program = sample(f"assistant {i} sampler", assistant, s.sampling_batch_size, "sampling.batch_size", theirs, tp)
        program.from_folder = config_lib.used_as_shipped(a)
        out.append(program)
    return out
