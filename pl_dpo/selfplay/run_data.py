"""A run's inputs, prepared once: tokenizer, training prompts with their ranked responses, held-out split.

`prepare_data` loads both splits (TFDS builders under `layout.tfds_dir`), tokenises them
once (truncating and counting by the configured budget) and lays out the fixed-shape
arrays every round shares; the round loop reads the frozen `RunData` it returns.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_collections
from etils import epath

from pl_dpo import config_lib, evaluate, sharding
from pl_dpo.data import Example, RankedSet, TokenizeConfig, assemble_ranked, load_split
from pl_dpo.data.tokenize import encode_examples
from pl_dpo.selfplay.modes import TokenIds
from pl_dpo.settings import RunSettings
from pl_dpo.tokenizer import build_tiny_tokenizer, load_tokenizer
from pl_dpo.workdir import bucket
from pl_dpo.workdir import layout as wd
from pl_dpo.workdir.metric_log import MetricLog

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunData:
    tokenize: TokenizeConfig
    train_examples: list[Example]
    train_prompt_ids: list[TokenIds]
    train_response_ids: list[list[TokenIds]]  # per prompt: the dataset's responses, best first (+EOS)
    sft_set: RankedSet  # K=1: prompt + dataset answer, the layout of every round
    heldout: evaluate.HeldOut

    @property
    def train_answer_ids(self) -> list[TokenIds]:
        return [responses[0] for responses in self.train_response_ids]


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """A configured folder, else the model's own folder, else a tiny one built once in the workdir."""
    path = config.tokenizer.path or config.model.hf_path
    if path:
        try:
            return load_tokenizer(path)
        except (FileNotFoundError, ValueError) as e:
            field = "tokenizer.path" if config.tokenizer.path else "model.hf_path"
            raise config_lib.ConfigError(f"config.{field}: {e}") from None
    path = wd.tokenizer_dir(workdir)
    if not epath.Path(path, "tokenizer.json").exists() and jax.process_index() == 0:
        with bucket.staged_folder(path, marker="tokenizer.json") as folder:  # a bucket: built here, uploaded
            build_tiny_tokenizer(folder, vocab_size=config.tokenizer.vocab_size)
    sharding.sync_processes("tokenizer")  # the others read what process 0 wrote
    with bucket.local_folder(path) as folder:
        return load_tokenizer(folder)


def ranked_set(
    settings: RunSettings, pad_id: int, prompt_ids: list[TokenIds], lists: list[list[TokenIds]], k: int
) -> RankedSet:
    """Prompts with K responses each in the fixed layout (L = max prompt + max response) of every round."""
    return assemble_ranked(
        prompt_ids, lists, pad_id=pad_id, k=k, seq_len=settings.seq_len, prompt_len=settings.tokenize.max_prompt_len
    )


def _load(config: ml_collections.ConfigDict, workdir: str, split: str, limit: int | None) -> list[Example]:
    data = config.data
    files = {name: path for name, path in dict(data.files).items() if path} or None
    examples = load_split(
        data.source,
        split,
        data_dir=wd.tfds_dir(workdir),
        files=files,
        skip_bad_rows=data.skip_bad_rows,
        **dict(data.options),
    )
    return examples[:limit] if limit else examples


def _encode(tokenizer, examples, tokenize: TokenizeConfig, split: str, metric_log: MetricLog, max_fraction: float):
    prompt_ids, response_ids, stats = encode_examples(tokenizer, examples, tokenize)
    metric_log.write(f"data/{split}", 0, stats.summary())
    for what, cut, total, field in (
        ("prompts", stats.prompts_truncated, stats.rows, "max_prompt_len"),
        ("responses", stats.responses_truncated, stats.responses, "max_response_len"),
    ):
        if total and cut / total > max_fraction:
            raise config_lib.ConfigError(
                f"{split}: {cut} of {total} {what} ({cut / total:.0%}) are longer than "
                f"config.data.{field}={getattr(tokenize, field)} tokens and would be truncated; raise it, "
                f"or config.data.max_truncated_fraction={max_fraction} to accept that"
            )
    if stats.prompts_truncated or stats.responses_truncated:
        log.warning(
            "%s: truncated %d prompts and %d responses (data.max_prompt_len / max_response_len)",
            split,
            stats.prompts_truncated,
            stats.responses_truncated,
        )
    return prompt_ids, response_ids


def prepare_data(config: ml_collections.ConfigDict, tokenizer, workdir: str, metric_log: MetricLog) -> RunData:
    settings = config_lib.run_settings(config)
    tokenize = settings.tokenize
    pad_id = tokenizer.pad_token_id
    if tokenize.prompt_template == "auto" and not getattr(tokenizer, "chat_template", None):
        log.warning(
            "the tokenizer %s has no chat template: prompts are written as 'User: <prompt>\\nAssistant:\\n' "
            "(pl_dpo.data.tokenize.prompt_text, the plain template)",
            tokenizer.name_or_path or "",
        )
    train_examples = _load(config, workdir, "train", config.data.num_train)
    test_examples = _load(config, workdir, "test", config.eval.num_prompts)
    max_fraction = settings.max_truncated_fraction
    train_prompts, train_responses = _encode(tokenizer, train_examples, tokenize, "train", metric_log, max_fraction)
    test_prompts, test_responses = _encode(tokenizer, test_examples, tokenize, "test", metric_log, max_fraction)
    answers = lambda responses: [r[:1] for r in responses]
    heldout = evaluate.HeldOut(
        examples=test_examples,
        answers=ranked_set(settings, pad_id, test_prompts, answers(test_responses), k=1),
        prompt_ids=test_prompts,
        answer_ids=[r[0] for r in test_responses],
        checkable=config.data.source == "synthetic",
    )
    return RunData(
        tokenize=tokenize,
        train_examples=train_examples,
        train_prompt_ids=train_prompts,
        train_response_ids=train_responses,
        sft_set=ranked_set(settings, pad_id, train_prompts, answers(train_responses), k=1),
        heldout=heldout,
    )
