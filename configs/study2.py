"""The second study (issue 14; results in experiments/RESULTS.md): the newer methods from a converged SFT start.

    JAX_PLATFORMS=cpu .venv/bin/python experiments/sweep.py --config=configs/study2.py --sweep_dir=runs/study2
    .venv/bin/python experiments/report.py --sweep_dir=runs/study2 --out=experiments/RESULTS.md

The first study (configs/study.py, experiments/RESULTS_study1.md) found that from an
undertrained SFT start more SFT epochs beat SPIN, and from a 4x longer one they tie. Here
πθ(0) is SFT trained to convergence: early stopping on the held-out answers' log-likelihood
(read every 100 steps, stop after 3 readings without a new best; at most 4000 steps), so
that more SFT epochs no longer help. Then, three rounds each, every arm from the same πθ(0)
of its seed:

  arm                         mode / setting                                K
  continued SFT (control)     sft                                           -
  SPIN                        spin                                          2
  SPIN + round mixing         spin, rounds.mix_previous=1 (re-scored)       2
  SPIN + SFT anchor           spin, loss.sft_weight=1                       2
  aSFT                        asft, one assistant (96x3, 2000 SFT steps)    3
  self-play triplets          triplet (answer > πθ(0) sample > πθ(t))       3
  verifier-ranked lists       ranked_samples, K samples of πθ(t) by score   2, 3, 4
  ... with LiPO-lambda        ranked_samples, loss.variant=lipo_lambda      4

Equal gradient steps: every arm takes 124 steps of 32 lists per round at the same lr (2 epochs of
62 full batches); rounds.max_steps=125 caps the mixed arm, whose set is twice as large after
round 1, at one step more. Generation: SPIN samples each training prompt once per round,
triplets once per round plus πθ(0)'s samples once, aSFT once per round plus the assistant's
once, verifier-ranked lists K times per round. For an equal generation budget, the verifier-
ranked lists run again on 2000 // K prompts a round (`rounds.prompts_per_round`, a new random
subset each round: K x 2000 / K samples, as many as SPIN), still at 124 steps a round.
K=2 verifier-ranked lists are two samples of the policy, the better one on top (not the
dataset answer: that is SPIN, `rounds.answer_on_top`).

The temperature sweep (T in {0.1, 1, 25} besides the main arms' 5; 250x) runs for the arms
in T_ARMS, chosen after the main arms' results (the issue's "best arms").

Same task, model and round schedule as the first study (2000 / 300 prompts, the 64x2 policy,
rounds of lr 3e-4 linear decay, T=5), seeds 0, 1, 2. Jobs of a seed share the tokenizer,
dataset and πθ(0) (experiments/sweep.py copies them). `--quick`: the CI variant, two tiny jobs.
"""

from __future__ import annotations

from configs import study
from configs.common import assistant, parse_arg

SEEDS = (0, 1, 2)
T_VALUES = (0.1, 1.0, 25.0)  # besides the main arms' T=5
# The arms of the temperature sweep, as their override dicts (without seed and T). Chosen after the main arms
# of seeds 0 and 1: triplets, the self-play arm with the largest gain over continued SFT in answer likelihood,
# and the verifier-ranked lists at K=3, the listwise arm the expectation is about.
T_ARMS = ({"modes": "triplet"}, {"modes": "ranked_samples", "loss.K": 3})
NUM_TRAIN = 2000
STEPS_PER_ROUND = 125  # a cap above the 124 steps of 2 epochs of 2000 prompts at batch 32 (62 full batches)


def get_config(arg: str | None = None):
    quick = parse_arg(arg, quick=False).quick
    c = study.get_config(arg)
    c.modes = "sft,spin,triplet,asft" if not quick else "sft,spin,triplet"
    # Converged SFT: steps is a maximum, early stopping on held-out answer log-likelihood.
    c.sft.update(steps=40 if quick else 4000, eval_every=10 if quick else 100, patience=3)
    # aSFT's assistant must rank above the converged policy: wider, deeper and trained as long.
    c.assistants = [assistant(96, 3, 30 if quick else 2000)]
    c.rounds.update(num=1 if quick else 3, epochs=2, max_steps=4 if quick else STEPS_PER_ROUND, mix_previous=0)
    c.loss.K = 0  # ranked_samples jobs set it
    return c


def _main_arms(seed: int) -> list[dict]:
    return [
        {"seed": seed},  # continued SFT, SPIN, triplets, aSFT (one job: they share the assistant)
        {"seed": seed, "modes": "spin", "rounds.mix_previous": 1},
        {"seed": seed, "modes": "spin", "loss.sft_weight": 1.0},
        *({"seed": seed, "modes": "ranked_samples", "loss.K": k} for k in (2, 3, 4)),
        {"seed": seed, "modes": "ranked_samples", "loss.K": 4, "loss.variant": "lipo_lambda"},
    ]


def _equal_generation_arms(seed: int) -> list[dict]:
    """Verifier-ranked lists at SPIN's generation budget: K samples of 2000 // K prompts a round (a new random
    subset each round), still 124 steps a round (more epochs over the smaller set, capped)."""
    return [
        {
            "seed": seed,
            "modes": "ranked_samples",
            "loss.K": k,
            "rounds.prompts_per_round": NUM_TRAIN // k,
            "rounds.epochs": 9,
            "rounds.max_steps": 124,
        }
        for k in (2, 3, 4)
    ]


def sweep(arg: str | None = None) -> list[dict]:
    """Seed-major main arms first (an interrupted study has every arm of the first seeds), then T."""
    if parse_arg(arg, quick=False).quick:
        return [{"seed": 0}, {"seed": 0, "modes": "ranked_samples", "loss.K": 3}]
    jobs = [job for seed in SEEDS for job in _main_arms(seed)]
    jobs += [{"seed": seed, **arm, "loss.T": T} for seed in SEEDS for arm in T_ARMS for T in T_VALUES]
    # Added after the first 39 jobs, for the "equal generation budget" (run last, so the others stand).
    jobs += [job for seed in SEEDS for job in _equal_generation_arms(seed)]
    return jobs
