"""What a run's stages read from the config, typed once at the config boundary (`config_lib.run_settings`).

The self-play stages, the generation helpers and the planner read these frozen dataclasses instead of the
ConfigDict, so a field has one default (configs/common.py:base()) and one reader; model, data and assistant
sections still reach the code that builds models and reads data (selfplay.rounds / policies / run_data).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pl_dpo.data import PackedBatch, RankedBatch, TokenizeConfig
from pl_dpo.losses import LossConfig
from pl_dpo.selfplay.modes import Mode
from pl_dpo.training.train import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
    """One kind of training phase: SFT of πθ(0) or an assistant (`steps`), or a self-play round (`epochs`)."""

    batch_size: int
    optim: OptimizerConfig
    steps: int  # SFT: the number of steps (0: the model as loaded); with eval_every > 0 a maximum
    epochs: int  # rounds: epochs over the round's training set
    max_steps: int | None  # rounds: a cap on the steps of a round (None: all epochs)
    eval_every: int  # early stopping on the held-out answers' log-likelihood every this many steps (0: none)
    patience: int  # readings in a row without a new best before it stops
    lr_per_round: tuple[float, ...]  # rounds: one learning rate per round (empty: optim.lr)

    def round_optim(self, t: int) -> OptimizerConfig:
        """The optimizer of round t: `optim`, with round t's own learning rate when `lr_per_round` gives one."""
        return dataclasses.replace(self.optim, lr=float(self.lr_per_round[t])) if self.lr_per_round else self.optim


@dataclasses.dataclass(frozen=True)
class HarnessSettings:
    """config.eval.harness: lm-evaluation-harness tasks scored on every policy of the run (`pl_dpo.harness`)."""

    tasks: tuple[str, ...]
    include_path: str | None  # a folder of task YAMLs of the user's own
    num_fewshot: int | None  # None: each task's own
    limit: int | None  # documents per task (None: all)
    batch_size: int
    apply_chat_template: bool
    max_length: int | None  # None: the model's max_position_embeddings


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The run-wide settings of a config (configs/common.py:base() has their defaults and meanings)."""

    seed: int
    arms: tuple[tuple[Mode, int], ...]  # config.modes in order, each with its K (config_lib.list_size)
    loss: LossConfig
    tokenize: TokenizeConfig  # data.max_prompt_len / max_response_len: the fixed layout of every array
    max_truncated_fraction: float
    pack_prompt: bool  # data.pack_prompt: the K responses of a list behind one copy of its prompt
    length_buckets: tuple[int, ...] | None  # data.length_buckets (None: powers of two)
    logprob_chunk: int
    eval_batch_size: int
    # What a policy's held-out evaluation depends on (workdir.layout.EVAL_FIELDS), recorded in eval_<t>.json.
    eval_record: dict[str, Any]
    harness: HarnessSettings | None  # None: no harness tasks
    sampling_batch_size: int
    decode_tp: int | None  # sampling.decode_tp (None: the sampler's rule, decode_layout.decode_tp_split)
    save_every_steps: int
    keep_train_state: bool
    export_hf: bool
    sft: PhaseSettings
    rounds: PhaseSettings
    num_rounds: int
    prompts_per_round: int  # 0: every training prompt each round
    mix_previous: int
    mix_rescore: bool
    answer_on_top: bool

    @property
    def batch_type(self) -> type[RankedBatch] | type[PackedBatch]:
        """The batch layout of training, reference scoring and evaluation (`pack_prompt`)."""
        return PackedBatch if self.pack_prompt else RankedBatch

    @property
    def seq_len(self) -> int:
        """L of every ranked array: the longest prompt plus the longest response."""
        return self.tokenize.max_prompt_len + self.tokenize.max_response_len
