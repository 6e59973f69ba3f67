"""config.eval.harness in the run: lm-evaluation-harness tasks scored on a policy in memory, on its mesh, with no
export (`pl_dpo.selfplay.rounds` calls `scores` for πθ(0) and every round's policy)."""

from __future__ import annotations

import logging
import os
from typing import Any

from pl_dpo.config_lib import ConfigError
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


class TaskError(ConfigError):
    """config.eval.harness asks for what the run cannot score offline; names the field, the task, what to do."""


def offline() -> None:
    """Nothing is downloaded: lm-eval's datasets come from local files (or an existing Hugging Face cache)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def check(settings: HarnessSettings) -> None:
    """The harness can run (`config_lib.validate`): lm-eval installed, the include folder there, every task known,
    its dataset on disk, and the few-shot examples asked for there (each task's documents loaded once, offline:
    ~0.1 s for a local file)."""
    if settings.include_path and not os.path.isdir(settings.include_path):
        raise TaskError(f"config.eval.harness.include_path={settings.include_path}: no such folder")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError("config.eval.harness.tasks needs lm-eval: pip install -e '.[eval]'") from None
    if settings.max_length is not None and settings.max_length < 2:
        raise TaskError(f"config.eval.harness.max_length={settings.max_length} must be >= 2 (or 0: the model's)")
    offline()
    where = "config.eval.harness.tasks:"
    manager = task_manager(settings.include_path, settings.tasks)
    unknown = [t for t in settings.tasks if t not in set(manager.all_tasks)]
    if unknown:
        local = sorted(task_manager(settings.include_path, ()).all_tasks) if settings.include_path else []
        found = f"; tasks in {settings.include_path}: {', '.join(local) or 'none'}" if settings.include_path else ""
        raise TaskError(f"{where} unknown task(s) {', '.join(unknown)} (lm-eval's, or YAMLs in include_path){found}")
    for name in settings.tasks:
        try:
            loaded = manager.load([name])["tasks"]
        except (ConnectionError, FileNotFoundError) as e:
            raise TaskError(
                f"{where} task {name}: its dataset is not on this machine and nothing is downloaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}); write a task YAML with dataset_path: json and dataset_kwargs.data_files "
                "naming local files, in include_path"
            ) from None
        for task in loaded.values():
            shots = task.config.num_fewshot if settings.num_fewshot is None else settings.num_fewshot
            docs = task.fewshot_docs()
            available = len(docs) if docs is not None else len(task.eval_docs) - 1
            if shots and shots > available:
                raise TaskError(
                    f"{where} task {task.config.task}: num_fewshot={shots}, but its few-shot split has {available} examples"
                )


def check_chat_template(settings: HarnessSettings | None, tokenizer) -> None:
    """The chat template asked for is there (lm-eval would fail at the first request, after πθ(0)'s training)."""
    if settings is not None and settings.apply_chat_template and not tokenizer.chat_template:
        raise TaskError(
            f"config.eval.harness.apply_chat_template=True, but the run's tokenizer ({tokenizer.name_or_path}) "
            "has no chat template"
        )


def scores(model, tokenizer, settings: HarnessSettings, seed: int) -> dict[str, Any]:
    """Every numeric metric (and its stderr) of `settings.tasks` for `model`, as {"<task>/<metric>": value}."""
    import lm_eval

    from pl_dpo.harness.lm import PlDpoLM

    offline()
    # lm-eval logs every task's settings at INFO; the run's log says what is evaluated and the scores.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = PlDpoLM(
        model=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length, seed=seed
    )
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
