"""Follow-up to configs/study.py question 2: the ladder with assistants ordered by measured quality.

    .venv/bin/python experiments/sweep.py --config=configs/study_ladder.py --sweep_dir=runs/study
    .venv/bin/python experiments/report.py --sweep_dir=runs/study --out=experiments/RESULTS_study1.md \
        --plots_dir=experiments/plots_study1

In the study the ladder's second assistant (80x2, 250 SFT steps) was weaker than the policy
(3% of its samples correct vs ~8% for the policy's own), so its K=4 lists were misordered.
Here the assistants, strongest first, are a policy-sized model trained 4x longer (64x2,
1200 SFT steps: ~68% of its samples correct in the study) and the study's first assistant
(96x3, 400 steps: ~23%), above the policy's own sample (~8%). Everything else, including
πθ(0) (copied from the study's jobs of the same seed when run into the same sweep dir), is
the study's. Ladder only, 2 rounds, 3 seeds.
"""

from __future__ import annotations

from configs import study
from configs.common import assistant, parse_arg


def get_config(arg: str | None = None):
    c = study.get_config(arg)
    quick = parse_arg(arg, quick=False).quick
    c.modes = "ladder"
    c.rounds.num = 1 if quick else 2
    c.assistants = [assistant(64, 2, 30 if quick else 1200), assistant(96, 3, 30 if quick else 400)]
    return c


def sweep(arg: str | None = None) -> list[dict]:
    # "modes" repeats the default so that the job names differ from the study's (same sweep dir).
    return [{"seed": s, "modes": "ladder"} for s in ((0,) if parse_arg(arg, quick=False).quick else study.SEEDS)]
