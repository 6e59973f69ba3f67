"""The built-in demo: SFT -> assistant -> SPIN and aSFT rounds on the synthetic task, CPU, minutes.

    python -m pl_dpo.main --config=configs/demo.py --workdir=runs/demo

A tiny Llama-style policy (~0.2M parameters) is fine-tuned on the built-in verifiable
tasks (addition, sorting, reversal); a larger assistant (~0.8M) is trained the same
way for longer. Then two self-play arms start from the same SFT policy: SPIN (K=2:
answer > own sample) and aSFT (K=3: answer > assistant sample > own sample), two
rounds each (three rounds each). The run ends with a table of held-out exact match (greedy decoding
checked by the task checker), answer log-likelihood, implicit-reward accuracy and
win rate against the SFT policy. Expected: both arms above the SFT row in exact
match and answer log-likelihood (see README for the measured numbers).

`get_config("quick")` is the shortened form used by the tests.
"""

import ml_collections

from configs.common import assistant, base, model, optimizer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    quick = arg == "quick"
    c = base(seed=0)
    c.modes = "spin,asft"
    c.model = model(
        overrides=dict(
            hidden_size=64,
            intermediate_size=192,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=128,
        )
    )
    c.data.options = dict(
        seed=0,
        n_train=400 if quick else 2000,
        n_test=64 if quick else 300,
        tasks=("add", "sort", "reverse"),
        min_difficulty=1,
        max_difficulty=3,
    )
    # One sequence length (40 + 16) for every batch: at this size a recompile costs more than padding.
    c.data.length_buckets = (56,)
    c.sft.steps = 20 if quick else 300
    # Assistants, strongest first: aSFT (K=3) uses the first, a ladder (K=4) both.
    c.assistants = [
        assistant(hidden=96, layers=3, steps=30 if quick else 400),
        assistant(hidden=80, layers=2, steps=20 if quick else 250),
    ]
    # T=5, not the paper's 0.1: at small T, pushing the policy's own samples down has no
    # saturation and drags the answers' likelihood down with it on this task (README).
    c.loss.T = 5.0
    c.rounds.update(
        num=1 if quick else 3, epochs=2, max_steps=4 if quick else 0, optim=optimizer(5e-4, warmup=5, decay="linear")
    )
    c.sampling.batch_size = 256
    c.eval.batch_size = 128
    c.mesh.num_devices = 1  # one CPU device: tiny models gain nothing from sharding
    c.checkpoint.save_every_steps = 50
    c.logprob_chunk = 64
    return c


def sweep() -> list[dict]:
    """K (SPIN vs aSFT) x T."""
    return [{"modes": m, "loss.T": t} for m in ("spin", "asft") for t in (0.01, 0.1, 1.0)]
