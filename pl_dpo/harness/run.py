"""config.eval.harness in the run: lm-evaluation-harness tasks scored on a policy in memory, on its mesh, with no
export (`pl_dpo.selfplay.rounds` calls `scores` for πθ(0) and every round's policy)."""

from __future__ import annotations

import logging
from typing import Any

from pl_dpo.settings import HarnessSettings

log = logging.getLogger(__name__)


def metric_name(task: str, key: str) -> str:
    """lm-eval's "acc,none" / "exact_match,strict-match" of a task as "<task>/acc" / "<task>/exact_match/strict-match"
    (stderr: "<task>/acc_stderr")."""
    metric, _, filter_name = key.partition(",")
    return f"{task}/{metric}" + ("" if filter_name in ("", "none") else f"/{filter_name}")


def task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """lm-eval's TaskManager for `tasks`: the user's folder alone when it has them all (indexing lm-eval's own
    thousands of task files takes a while), else both."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def scores(model, tokenizer, settings: HarnessSettings, seed: int) -> dict[str, Any]:
    """Every numeric metric (and its stderr) of `settings.tasks` for `model`, as {"<task>/<metric>": value}."""
    import lm_eval

    from pl_dpo.harness.lm import PlDpoLM

    # lm-eval logs every task's settings at INFO; the run's log says what is evaluated and the scores.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = PlDpoLM(model=model, tokenizer=tokenizer, batch_size=settings.batch_size, seed=seed)
    result = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(settings.tasks),
        task_manager=task_manager(settings.include_path, settings.tasks),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        apply_chat_template=settings.apply_chat_template,
        fewshot_as_multiturn=settings.apply_chat_template and settings.num_fewshot != 0,
        random_seed=seed,
        numpy_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
        bootstrap_iters=1000,  # stderr of the metrics without a closed form (perplexities); lm-eval's 100000 is slow
    )
    out: dict[str, Any] = {}
    for task, metrics in (result or {}).get("results", {}).items():
        for key, value in metrics.items():
            # Scores only: lm-eval also reports how many documents it read ("samples", "sample_len").
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("sample"):
                out[metric_name(task, key)] = float(value)
    return out
