"""lm-evaluation-harness on a real model: pl_dpo's backend against lm-eval's own `hf` backend, in the same run.

SmolLM2-135M-Instruct (pl_dpo/models/smollm2.py) in float32 on three tasks:

- the repository's arithmetic multiple choice (configs/harness_tasks), 5 shots: answers of 2-3 digit tokens that
  often share their first digit, where the `hf` backend runs one row for every choices that differ only in their
  last token (its "one-token continuation" grouping);
- endings: 3-shot multiple choice between four different endings of ~16 words (the shape of HellaSwag), written
  here from a fixed word list (what is measured is speed, not a score);
- the arithmetic questions answered by greedy generation through the chat template.

pl_dpo scores the choices of a question behind one copy of their context (`harness.shared_context`), also timed
without (one row per choice). Both backends get the same requests and batch size; the figure is requests per
second of `lm_eval.simple_evaluate` (what a user waits for), and how often the two agree (the chosen answer / the
generated text, per document). The `quick` profile cuts the tasks to 8 documents.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np

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
    Case("arithmetic multiple choice, 5-shot", "pl_dpo_arith_mc", 5, chat=False),
    Case("endings multiple choice, 3-shot", "pl_dpo_endings_mc", 3, chat=False),
    Case("arithmetic generation, chat, greedy", "pl_dpo_arith_gen", 0, chat=True),
)
MULTIPLE_CHOICE = ("pl_dpo_arith_mc", "pl_dpo_endings_mc")
WORDS = (
    "the model reads a short story about river stone light garden window friend morning city music paper quiet "
    "green small old new bright cold warm runs walks finds keeps opens brings under over near after before because"
).split()


def write_endings_task(folder: str, docs: int = 24, shots: int = 3) -> None:
    """`pl_dpo_endings_mc`: a ~30-word context and four different ~16-word endings per document (the first is the
    label), random words from a fixed list and seed."""
    rng = np.random.default_rng(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS, n))

    rows = [
        {"ctx": text(30), "endings": [text(int(rng.integers(12, 20))) for _ in range(4)]} for _ in range(docs + shots)
    ]
    for split, part in (("train", rows[:shots]), ("test", rows[shots:])):
        with open(os.path.join(folder, f"endings_{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    with open(os.path.join(folder, "pl_dpo_endings_mc.yaml"), "w") as f:
        f.write(
            f"task: pl_dpo_endings_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    train: {folder}/endings_train.jsonl\n    test: {folder}/endings_test.jsonl\n"
            "training_split: train\nfewshot_split: train\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: 0\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
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
    # A run of simple_evaluate is seconds to a minute on CPU: 2 timed runs after a warm-up one.
    profile = dataclasses.replace(profile, repeats=min(profile.repeats, 2), warmup=1)
    folder = smollm2_folder()
    endings = tempfile.TemporaryDirectory()
    write_endings_task(endings.name)
    manager = TaskManager(include_path=[TASKS_DIR, endings.name], include_defaults=False)
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
            if name.endswith("per choice") and case.task not in MULTIPLE_CHOICE:
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
            answers[name] = _answers(samples, "mc" if case.task in MULTIPLE_CHOICE else "gen")
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
                    requests=requests, requests_per_s=requests / seconds, score=scores[name], agreement=agree,
                    timed_runs=profile.repeats, warmup_runs=profile.warmup)
            )  # fmt: skip
    endings.cleanup()
    return rows
