"""Pieces shared by the experiment configs (each config stays readable on its own)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """`get_config`'s one string argument as typed fields (big_vision style).

    `parse_arg("quick,rounds=4", quick=False, rounds=3)` -> quick=True, rounds=4: each
    `key=value` takes its default's type; a bare `key` sets a boolean default to True.
    Unknown keys are refused with the list of known ones.
    """
    out = dict(defaults)
    for item in (part.strip() for part in (arg or "").split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {item!r}: unknown key {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if not eq:
            if kind is not bool:
                raise ValueError(f"config argument {item!r}: {key} needs a value ({key}=...)")
            out[key] = True
        elif kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {item!r}: expected true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            out[key] = kind(value)
    return ml_collections.ConfigDict(out)


def optimizer(
    lr: float,
    warmup: int = 10,
    decay: str = "cosine",
    name: str = "adamw",
    clip_norm: float = 1.0,
    grad_accum_steps: int = 1,
    final_lr_fraction: float = 0.1,
    weight_decay: float = 0.0,
) -> ml_collections.ConfigDict:
    """optax optimizer section: AdamW or RMSprop, linear warmup, then constant / linear / cosine decay."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            lr=lr,
            warmup_steps=warmup,
            decay=decay,
            final_lr_fraction=final_lr_fraction,
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            grad_accum_steps=grad_accum_steps,
            rms_decay=0.9,
        )
    )


def lora(
    enabled: bool = False,
    rank: int = 16,
    alpha: float = 32.0,
    rslora: bool = False,
    targets: str = r"(q|k|v|o|gate|up|down)_proj$",
    init_adapter: str = "",
    frozen_int8: bool = False,
) -> ml_collections.ConfigDict:
    """A model's LoRA section (pl_dpo.models.lora). enabled: every phase that trains this model (its SFT, the rounds)
    trains adapters of `rank` on frozen weights, scaled alpha/rank (rslora: alpha/sqrt(rank)), and merges them
    into the phase's policy at its end. targets: a regex searched in the projections' module paths
    ("layers/attn/q_proj", "layers/mlp/down_proj", "lm_head"); the default is every attention and MLP projection.
    init_adapter: a PEFT adapter folder the model's SFT starts from (with sft steps 0: πθ(0) is the model with it
    merged). frozen_int8: QLoRA-style, the frozen projections as int8 while a phase trains (a quarter of float32's
    bytes); the adapters, trained against those, are merged into the full-precision weights at the phase's end."""
    return ml_collections.ConfigDict(
        dict(
            enabled=enabled,
            rank=rank,
            alpha=alpha,
            rslora=rslora,
            targets=targets,
            init_adapter=init_adapter,
            frozen_int8=frozen_int8,
        )
    )


def model(
    preset: str = "tiny-llama",
    hf_path: str = "",
    overrides: dict | None = None,
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    remat: str = "none",
    attention_impl: str = "einsum",
) -> ml_collections.ConfigDict:
    """A model section: a named preset with overrides, or a local Hugging Face folder (hf_path).

    remat: "none" | "full" | "dots" | "offload_dots"; attention_impl: "einsum" | "xla" | "cudnn" (GPU) | "splash" (TPU)."""
    return ml_collections.ConfigDict(
        dict(
            preset=preset,
            hf_path=hf_path,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            remat=remat,
            attention_impl=attention_impl,
            overrides=overrides or {},
            lora=lora(),
            # Sample this model with its layers' projections in weight-only int8 (pl_dpo.models.quant): half the
            # bytes of bf16 while decoding. An assistant only sampled loses nothing else; the policy's samples
            # then come from an approximation of πθ(t) (its training, scoring and evaluation stay exact).
            sample_int8=False,
        )
    )


def synthetic_task(n_train: int, n_test: int) -> dict:
    """Options of the built-in synthetic source: addition, sorting and reversal, difficulty 1-3."""
    return dict(
        seed=0, n_train=n_train, n_test=n_test, tasks=("add", "sort", "reverse"), min_difficulty=1, max_difficulty=3
    )


def small_llama(hidden: int, layers: int) -> ml_collections.ConfigDict:
    """A small Llama-style model section: 4 heads (2 KV heads), MLP 3x wide, 128 positions."""
    return model(
        overrides=dict(
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=128,
        )
    )


def assistant(hidden: int, layers: int, steps: int) -> ml_collections.ConfigDict:
    """A Llama-style assistant larger than the policy, trained by SFT on the same answers."""
    return ml_collections.ConfigDict(
        dict(sft_steps=steps, batch_size=32, optim=optimizer(3e-3), model=small_llama(hidden, layers))
    )


def base(seed: int = 0) -> ml_collections.ConfigDict:
    """Every section with neutral defaults; experiment configs override what they study."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.modes = "spin"
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=384))
    c.model = model()
    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            files=dict(train="", test=""),
            skip_bad_rows=False,
            num_train=0,
            options={},
            max_prompt_len=40,
            max_response_len=16,
            length_buckets=(),
            # Shared-prompt packing: the K responses of a list behind one copy of its prompt in training,
            # reference scoring and evaluation (pl_dpo.data.packing; equal to the plain layout up to float
            # rounding, and faster: BENCHMARKS.md).
            pack_prompt=True,
            # Refuse to run when more than this fraction of prompts or responses would be truncated.
            max_truncated_fraction=0.5,
        )
    )
    # eval_every > 0: early stopping on the held-out answers' log-likelihood (steps is then a maximum).
    c.sft = ml_collections.ConfigDict(dict(steps=0, batch_size=32, optim=optimizer(3e-3), eval_every=0, patience=3))
    c.assistants = []
    c.loss = ml_collections.ConfigDict(dict(K=0, T=0.1, variant="pl", top_m=0, sft_weight=0.0))
    c.rounds = ml_collections.ConfigDict(
        dict(
            num=1,
            epochs=1,
            batch_size=32,
            max_steps=0,  # 0: all epochs
            optim=optimizer(1e-5),
            lr_per_round=(),
            # Round mixing: also train on the ranked sets of this many previous rounds, their
            # reference log-probs re-scored with the round's reference (mix_rescore, SPIN's code) or kept.
            mix_previous=0,
            mix_rescore=True,
            answer_on_top=False,  # mode ranked_samples: the dataset answer above the K-1 ranked samples
            # Rank only this many training prompts per round (a random subset; 0: all): an arm's generation
            # budget, e.g. K samples of N/K prompts against SPIN's one sample of N.
            prompts_per_round=0,
        )
    )
    # decode_tp: chips per tensor-parallel group while sampling (0: the fewest that hold the weights,
    # decode_layout.decode_tp_split); it must divide the mesh's fsdp size.
    c.sampling = ml_collections.ConfigDict(
        dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, batch_size=64, decode_tp=0)
    )
    # harness: lm-evaluation-harness tasks scored on πθ(0) and every round's policy, in the run, on its mesh
    # (pl_dpo.harness; the `eval` extra). tasks: comma-separated names ("": off); include_path: a folder of task
    # YAMLs of your own; num_fewshot: -1 = each task's own; limit: documents per task (0: all); batch_size: 0 =
    # eval.batch_size; apply_chat_template: prompts (few-shot as turns) in the tokenizer's chat template;
    # max_length: tokens a request may take (longer ones lose their start; generation: prompt + new tokens), 0 = the
    # model's max_position_embeddings, as lm-eval's hf backend (the planner plans the harness at this length).
    harness = dict(
        tasks="", include_path="", num_fewshot=-1, limit=0, batch_size=0, apply_chat_template=False, max_length=0
    )
    c.eval = ml_collections.ConfigDict(dict(num_prompts=0, batch_size=64, harness=harness))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))
    # keep_train_state: keep each phase's mid-phase train states after its policy is committed.
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=200, keep_train_state=False))
    c.logprob_chunk = 256
    c.export_hf = False
    return c
