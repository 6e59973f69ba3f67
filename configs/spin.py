"""SPIN as in the paper (Chen et al. 2024): zephyr-7b-sft-full, UltraChat 50k, 3 rounds, on a TPU VM.

    python -m pl_dpo.plan --config=configs/spin.py --topology=v5e-16        # first: does it fit?
    python -m pl_dpo.main --config=configs/spin.py --workdir=gs://my-bucket/spin \
        --config.model.hf_path=/data/zephyr-7b-sft-full \
        --config.data.files.train=/data/ultrachat_200k/train_sft.parquet \
        --config.data.files.test=/data/ultrachat_200k/test_sft.parquet

Data and the model folder are read from local folders on every host (download them
beforehand: nothing downloads at run time); the workdir may be a bucket (gs://) or a folder
every host sees. The tokenizer and its chat template come from the model folder. Settings
follow the paper and its reference code: T (beta) = 0.1, RMSprop, learning rate 5e-7 in
rounds 0-1 and 1e-7 in round 2 with linear decay and 10% warmup, 2 epochs a round,
global batch 64, prompts of at most 512 tokens, sequences of at most 1024, 256 new
tokens sampled per prompt, bf16 compute with float32 master weights, full per-layer remat
and splash attention (what fits a v5e-16 without gradient accumulation, BENCHMARKS.md).
With `--config.export_hf=True` every round's policy is written to
`<workdir>/spin/hf_export/round_<t>` for lm-evaluation-harness (experiments/README.md).
Expected (paper, Open LLM Leaderboard average): 58.14 (SFT) -> 60.80, 62.12, 62.97 after
rounds 1-3 (the paper's iterations 0-2); `:rounds=4` adds iteration 3 (63.16, at lr 1e-7).

Pass `:rounds=N` to run N rounds (default 3).
"""

import ml_collections

from configs.common import base, model, optimizer, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    rounds = parse_arg(arg, rounds=3).rounds
    c = base(seed=42)
    c.modes = "spin"
    # preset: the shape of zephyr-7b-sft-full, for `python -m pl_dpo.plan` where the folder is absent.
    # Full remat and splash attention: what fits 64 pairs x 1024 tokens on a v5e-16 without gradient
    # accumulation (`python -m pl_dpo.plan --config=configs/spin.py --topology=v5e-16`; BENCHMARKS.md).
    c.model = model(
        preset="mistral-7b",
        hf_path="",
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat="full",
        attention_impl="splash",
    )
    c.tokenizer.path = ""  # empty: the model folder's tokenizer and chat template
    c.data.update(
        source="ultrachat",
        num_train=50_000,
        max_prompt_len=512,
        max_response_len=512,
        length_buckets=(256, 512, 768, 1024),
        # Plain rows: splash attention takes them as segments; packed rows need the dense block mask,
        # which at 7B and 1536-slot rows leaves 2% of a v5e chip's HBM free (BENCHMARKS.md, "Planner").
        pack_prompt=False,
    )
    c.data.files = dict(train="", test="")
    c.data.options = {}
    c.sft.steps = 0  # zephyr-7b-sft-full is already the SFT model πθ(0)
    c.loss.T = 0.1
    steps_per_epoch = 50_000 // 64
    c.rounds.update(
        num=rounds,
        epochs=2,
        batch_size=64,
        optim=optimizer(
            5e-7,
            warmup=int(0.1 * 2 * steps_per_epoch),
            decay="linear",
            name="rmsprop",
            clip_norm=0.0,
            final_lr_fraction=0.0,
        ),
        lr_per_round=(5e-7, 5e-7, 1e-7, 1e-7)[: max(rounds, 1)] if rounds <= 4 else (),
    )
    # 256 prompts at a time: on a v5e-16 at 7B the sampler splits them over 4 groups of 4 tensor-parallel
    # chips (9.23 GiB per chip by the planner), 4x the rows per step of batch 64 for 0.7x its step time bound.
    c.sampling.update(temperature=1.0, top_p=1.0, max_new_tokens=256, batch_size=256)
    c.eval.update(num_prompts=500, batch_size=64)
    c.mesh.update(data=1, fsdp=-1, tensor=1, num_devices=0)
    c.checkpoint.save_every_steps = 200
    c.logprob_chunk = 256
    return c


def sweep() -> list[dict]:
    """The paper's ablation of T (beta) around its choice."""
    return [{"loss.T": t} for t in (0.01, 0.1, 1.0)]
