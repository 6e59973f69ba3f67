"""lm-evaluation-harness on a real model: pl_dpo's backend against lm-eval's own `hf` backend, in the same run.

SmolLM2-135M-Instruct (pl_dpo/models/smollm2.py) in float32 on the repository's arithmetic tasks
(configs/harness_tasks): multiple choice with 5 shots (the choices share their few-shot context: pl_dpo scores
them behind one copy of it, `harness.shared_context`; also timed without, one row per choice), and greedy
generation through the chat template. Both backends get the same requests and batch size; the figure is
requests per second of `lm_eval.simple_evaluate` (what a user waits for), and how often the two agree (the
chosen answer / the generated text, per document). The `quick` profile cuts the tasks to 8 documents.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time

from benchmarks.common import Profile, row

TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "harness_tasks")
BATCH_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    task: str
    num_fewshot: int
    chat: bool


CASES = (
    Case("multiple choice, 5-shot", "pl_dpo_arith_mc", 5, chat=False),
    Case("generation, chat, greedy", "pl_dpo_arith_gen", 0, chat=True),
)


def _answers(samples: list[dict], task_type: str) -> list:
    """Per document: the chosen choice (multiple choice) or the generated text."""
    if task_type == "mc":
        return [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
    return [s["resps"][0][0] for s in samples]


def run(profile: Profile, with_torch: bool = True) -> list[dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pl_dpo.harness.lm import PlDpoLM
    from pl_dpo.harness.run import offline
    from pl_dpo.models.smollm2 import smollm2_folder

    offline()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    profile = dataclasses.replace(profile, repeats=min(profile.repeats, 3), warmup=1)
    folder = smollm2_folder()
    manager = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    backends = {
        "pl_dpo": PlDpoLM(path=folder, batch_size=BATCH_SIZE),
        "pl_dpo, one row per choice": PlDpoLM(path=folder, batch_size=BATCH_SIZE, share_contexts=False),
    }
    if with_torch:
        from lm_eval.models.huggingface import HFLM

        device = "cuda" if profile.gpu else "cpu"
        backends["lm-eval hf"] = HFLM(pretrained=folder, dtype="float32", batch_size=BATCH_SIZE, device=device)
    rows = []
    for case in CASES:

        def evaluate(lm, case=case):
            return lm_eval.simple_evaluate(
                model=lm, tasks=[case.task], task_manager=manager, num_fewshot=case.num_fewshot,
                limit=8 if profile.name == "quick" else None, apply_chat_template=case.chat, log_samples=True,
                bootstrap_iters=0, random_seed=0, numpy_random_seed=0, fewshot_random_seed=0,
            )  # fmt: skip

        answers, scores, times = {}, {}, {}
        for name, lm in backends.items():
            if name.endswith("per choice") and case.task != "pl_dpo_arith_mc":
                continue
            for _ in range(profile.warmup):
                result = evaluate(lm)
            took = []
            for _ in range(profile.repeats):
                start = time.perf_counter()
                result = evaluate(lm)
                took.append(time.perf_counter() - start)
            samples = result["samples"][case.task]
            requests = sum(len(s["arguments"]) for s in samples)
            answers[name] = _answers(samples, "mc" if case.task == "pl_dpo_arith_mc" else "gen")
            scores[name] = next(
                v for k, v in result["results"][case.task].items() if k.split(",")[0] in ("acc", "exact_match")
            )
            times[name] = (statistics.median(took), requests)
        base = "lm-eval hf" if "lm-eval hf" in times else None
        for name, (seconds, requests) in times.items():
            agree = None
            if base and name != base:
                agree = sum(a == b for a, b in zip(answers[name], answers[base], strict=True)) / len(answers[base])
            rows.append(
                row("harness_backend", case.name, name, baseline=base if name != base else None, step_s=seconds,
                    requests=requests, requests_per_s=requests / seconds, score=scores[name], agreement=agree)
            )  # fmt: skip
    return rows
