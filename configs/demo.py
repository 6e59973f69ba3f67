"""The built-in demo: SFT -> assistant -> SPIN and aSFT rounds on the synthetic task, CPU, minutes.

    python -m pl_dpo.main --config=configs/demo.py --workdir=runs/demo

A tiny Llama-style policy (0.14M parameters) is fine-tuned for 300 steps on the built-in
verifiable tasks (addition, sorting, reversal of up to 3 digits/letters); a larger
assistant (0.40M) is trained the same way for 400 steps. Then two self-play arms start from
the same SFT policy, three rounds each: SPIN (K=2: answer > own sample) and aSFT (K=3:
answer > assistant sample > own sample). The run ends with a table of held-out exact match
(greedy decoding checked by the task checker), answer log-likelihood, implicit-reward
accuracy and win rate against the SFT policy.

Expected (measured, seed 0, on three machines): exact match 0.160 (SFT) -> 0.207-0.240 after
SPIN's rounds and 0.187-0.233 after aSFT's, answer log-likelihood -5.64 -> about -5.1 / -5.2.
Bit for bit the same on one machine and build; across CPU types the rounds differ by a few
held-out prompts (README, "What reproduces, and how far").
Add `--config.modes=spin,asft,sft` for the control arm (the same steps spent on more SFT
epochs): it reaches 0.340, more than either self-play arm, because 300 SFT steps are far
from converged (experiments/RESULTS_study1.md studies this; the second study,
experiments/RESULTS.md, starts from a converged SFT).

T=5 rather than the paper's 0.1: on this task T <= 0.1 *lowers* exact match and answer
likelihood (0.160 -> 0.040 -> 0.017 over two SPIN rounds at T=0.1, lr 1e-4): at small T the
push-down of the policy's own samples does not saturate and drags the answers' likelihood
down with it (both share most tokens). `get_config("quick")` is the shortened form used by
the tests.
"""

import ml_collections

from configs.common import assistant, base, model, optimizer, parse_arg, synthetic_task


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    quick = parse_arg(arg, quick=False).quick
    c = base(seed=0)
    c.modes = "spin,asft"
    # The tiny-llama preset (hidden 64, 2 layers, 4 heads): 0.14M parameters with this vocabulary.
    c.model = model(overrides=dict(max_position_embeddings=128))
    c.data.options = synthetic_task(n_train=400 if quick else 2000, n_test=64 if quick else 300)
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
