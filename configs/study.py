"""The self-play study on the built-in synthetic task (issue 6; results in experiments/RESULTS.md).

    .venv/bin/python experiments/sweep.py --config=configs/study.py            # all jobs, resumable
    .venv/bin/python experiments/report.py --sweep_dir=runs/study --out=experiments/RESULTS.md

Four questions, each >= 3 seeds (config.seed: model init, sampling, batch order; the
task data is fixed, data.options.seed=0, so every seed sees the same 2000/300 prompts):
  1. rounds vs epochs: SPIN rounds 1..3 against the control arm (mode "sft": the same
     number of gradient steps per round spent on more SFT epochs on the dataset answers);
  2. K at the same compute: SPIN (K=2), aSFT (K=3, one assistant), ladder (K=4, two
     assistants), every arm 3 rounds of 2 epochs with the same batch size and lr;
  3. T in {0.1, 1, 5, 25} (250x) for K=2 and K=3, 2 rounds;
  4. training-set size: the first 500 / 1000 / 2000 training prompts (data.num_train;
     same held-out set), SPIN and the SFT control, 2 rounds;
  5. (added after the first results: the 300-step SFT start is far from converged, so the
     control arm gains more than SPIN) rounds vs epochs again from a 4x longer SFT start
     (sft.steps=1200), SPIN and the control arm, 3 rounds.
Jobs 1+2 are one job per seed (modes share SFT and assistants); experiments/sweep.py seeds
the T and size jobs of a seed with that job's SFT / assistants when their configs agree.

The model and schedule are those of configs/demo.py at the time of the study (pinned
here so the study does not move when the demo does). `get_config("quick")` and
`sweep("quick")` are the CI variant: two tiny jobs.
"""

from __future__ import annotations

import ml_collections

from configs.sweeps import concat, product

SEEDS = (0, 1, 2)
T_VALUES = (0.1, 1.0, 5.0, 25.0)
NUM_TRAIN = (500, 1000, 0)  # 0: all 2000
LONG_SFT_STEPS = 1200


def _optimizer(lr: float, warmup: int = 10, decay: str = "cosine") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, warmup_steps=warmup, decay=decay, final_lr_fraction=0.1, b1=0.9, b2=0.98,
        eps=1e-8, weight_decay=0.0, clip_norm=1.0, grad_accum_steps=1, rms_decay=0.9))


def _model(hidden: int, layers: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        preset="tiny-llama", hf_path="", param_dtype="float32", compute_dtype="float32", remat="none",
        overrides=dict(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers, num_heads=4,
                       num_kv_heads=2, head_dim=hidden // 4, max_position_embeddings=128)))


def _assistant(hidden: int, layers: int, steps: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(sft_steps=steps, batch_size=32, optim=_optimizer(3e-3),
                                          model=_model(hidden, layers)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.modes = "spin,asft,ladder,sft"
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=384))
    c.model = _model(hidden=64, layers=2)  # ~0.2M parameters
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", files={}, skip_bad_rows=False, num_train=0,
        options=dict(seed=0, n_train=400 if quick else 2000, n_test=64 if quick else 300,
                     tasks=("add", "sort", "reverse"), min_difficulty=1, max_difficulty=3),
        max_prompt_len=40, max_response_len=16, length_buckets=(56,)))
    c.sft = ml_collections.ConfigDict(dict(steps=20 if quick else 300, batch_size=32, optim=_optimizer(3e-3)))
    # Strongest first: aSFT ranks [answer, assistant 0, own]; the ladder [answer, a0, a1, own].
    c.assistants = [_assistant(96, 3, 30 if quick else 400), _assistant(80, 2, 20 if quick else 250)]
    c.loss = ml_collections.ConfigDict(dict(K=0, T=5.0, variant="pl", top_m=0))
    c.rounds = ml_collections.ConfigDict(dict(
        num=1 if quick else 3, epochs=2, batch_size=32, max_steps=4 if quick else None,
        optim=_optimizer(3e-4, warmup=5, decay="linear"), lr_per_round=()))
    c.sampling = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16,
                                                batch_size=256))
    c.eval = ml_collections.ConfigDict(dict(num_prompts=0, batch_size=128))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=1))
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=50))
    c.logprob_chunk = 64
    c.export_hf = False
    if quick:
        c.modes = "spin"
    return c


def sweep(arg: str | None = None) -> list[dict]:
    """Seed-major, so an interrupted study has every cell for the first seeds; within a seed the
    big job (1+2) comes first and seeds the T and size jobs with its SFT and assistants."""
    if arg == "quick":
        return product(**{"loss.T": [1.0, 5.0]})
    jobs = []
    for seed in SEEDS:
        jobs += concat(
            [{"seed": seed}],  # 1 + 2: spin, asft, ladder, sft control; T=5; 3 rounds
            product([{"seed": seed, "modes": "spin,asft", "rounds.num": 2}],
                    **{"loss.T": [t for t in T_VALUES if t != 5.0]}),
            product([{"seed": seed, "modes": "spin,sft", "rounds.num": 2}],
                    **{"data.num_train": [n for n in NUM_TRAIN if n]}),
        )
    # 5 comes last: the first four studies are complete before it starts.
    jobs += [{"seed": seed, "modes": "spin,sft", "sft.steps": LONG_SFT_STEPS} for seed in SEEDS]
    return jobs
