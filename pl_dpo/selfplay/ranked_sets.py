"""A round's training set: its prompts, the samples it ranks, its ranked lists with reference log-probs, and
the mixed set of round mixing (docs/ARCHITECTURE.md, "Data flow of a round").

What each mode ranks is data (`modes.MODES`); this module gathers what the lists are built from
(`modes.ListSources`: dataset answers, samples of πθ(t), of the assistants and of πθ(0), the verifier) and
commits every output once (`stages.load_or_make`): assistant and πθ(0) samples in `<lineage>/samples.npz`,
a round's ranked set in `<mode>/round_<t>/ranked.npz`, its mixed set in `<mode>/round_<t>/mixed.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from pl_dpo import config_lib, sampler, scoring
from pl_dpo.data import DamagedFile, RankedSet, concat_ranked_sets, grade_answer, load_ranked_set, tokenize_examples
from pl_dpo.decode_layout import ModelFolder
from pl_dpo.models import Decoder
from pl_dpo.selfplay import generation, modes, seeds, stages
from pl_dpo.selfplay.modes import TokenIds
from pl_dpo.selfplay.run_data import RunData, ranked_set
from pl_dpo.settings import RunSettings
from pl_dpo.tokenizer import load_tokenizer
from pl_dpo.workdir import layout as wd
from pl_dpo.workdir.metric_log import MetricLog


class RankedSets:
    """Builds (or loads, when committed) the ranked sets of a run's rounds.

    `assistant(i)` gives assistant i (trained or loaded once by the caller) and `assistant_tokenizers[i]` its
    own tokenizer folder ("" when it shares the policy's), `assistant_int8[i]` whether it samples with int8
    weights; `sft_policy()` restores πθ(0). `sampling` is the policy's (its `int8`: config.model.sample_int8)."""

    def __init__(
        self,
        workdir: str,
        settings: RunSettings,
        sampling: sampler.SamplingConfig,
        data: RunData,
        tokenizer,
        metric_log: MetricLog,
        *,
        assistant: Callable[[int], Decoder | ModelFolder],
        assistant_tokenizers: tuple[str, ...],
        assistant_int8: tuple[bool, ...],
        sft_policy: Callable[[], Decoder],
        round_start: Callable[[modes.Mode, int], Decoder],
    ):
        self.workdir, self.settings, self.sampling, self.data = workdir, settings, sampling, data
        self.tokenizer, self.metric_log = tokenizer, metric_log
        self.assistant, self.assistant_tokenizers, self.sft_policy = assistant, assistant_tokenizers, sft_policy
        self.assistant_int8 = assistant_int8  # each assistant's model.sample_int8
        self.round_start = round_start  # πθ(t) of a mode, from disk: remakes a damaged earlier set for mixing
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    # --------------------------------------------------------------------------- samples

    def round_prompts(self, mode: modes.Mode, t: int) -> np.ndarray | None:
        """The training prompts round t of `mode` ranks: all of them (None), or with `rounds.prompts_per_round`
        a random subset of that many, drawn from the seed, the mode and the round (sorted). It sets an arm's
        generation budget, e.g. K samples of N/K prompts per round against SPIN's one sample of N."""
        p, n = self.settings.prompts_per_round, len(self.data.train_prompt_ids)
        if not p or mode.one_set:
            return None
        if p > n:
            raise config_lib.ConfigError(f"config.rounds.prompts_per_round={p} exceeds the {n} training prompts")
        rng = np.random.default_rng(seeds.stage_seed(self.settings.seed, f"{mode.name}/round_{t}/prompts"))
        return np.sort(rng.choice(n, p, replace=False))

    def samples(
        self, model: Decoder, label: str, desc: str, prompts: np.ndarray | None = None, sampling=None
    ) -> list[TokenIds]:
        """One sampled response per training prompt (or per prompt of the indices `prompts`, in that order),
        the key drawn from `label`; `sampling`: the policy's unless given."""
        sft_set = self.data.sft_set
        if prompts is not None:  # responses come back in the subset's order
            sft_set = sft_set.take(prompts).replace(example_ids_N=np.arange(len(prompts)))
        with self.metric_log.timed(label, "generation"):
            return self._sample(model, sft_set.prompts(), sampling or self.sampling, label, desc)

    def _sample(self, model, prompts, sampling, label: str, desc: str) -> list[TokenIds]:
        key = seeds.stage_key(self.settings.seed, label)
        return generation.sample_responses(
            model,
            prompts,
            sampling,
            key,
            batch_size=self.settings.sampling_batch_size,
            decode_tp=self.settings.decode_tp,
            desc=desc,
        )

    def _foreign_samples(self, index: int, model: Decoder, tokenizer_path: str) -> list[TokenIds]:
        """Samples of an assistant with its own tokenizer: prompts in its chat template,
        answers decoded to text and tokenised again with the policy's tokenizer."""
        tok = load_tokenizer(tokenizer_path)
        own, _ = tokenize_examples(tok, self.data.train_examples, self.data.tokenize, k=1)
        sampling = dataclasses.replace(
            self.sampling,
            eos_ids=(tok.eos_token_id,),
            pad_id=tok.pad_token_id,
            int8=self.assistant_int8[index],
            num_ids=len(tok),
        )
        label = f"assistant_{index}/samples"
        ids = self._sample(model, own.prompts(), sampling, label, f"assistant_{index} samples")
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in ids]
        return generation.retokenise(texts, self.data.train_examples, self.tokenizer, self.data.tokenize, self.eos_id)

    def assistant_samples(self, index: int) -> list[TokenIds]:
        """Samples of assistant `index` on the training prompts, generated once and cached."""
        lineage = f"assistant_{index}"
        path = wd.samples_path(self.workdir, lineage)

        def generate() -> list[TokenIds]:
            model = self.assistant(index)
            if self.assistant_tokenizers[index]:
                return self._foreign_samples(index, model, self.assistant_tokenizers[index])
            sampling = dataclasses.replace(self.sampling, int8=self.assistant_int8[index])
            return self.samples(model, f"{lineage}/samples", f"{lineage} samples", sampling=sampling)

        return stages.load_or_make(
            stages.exists(path),
            lambda: stages.load_samples(path),
            generate,
            lambda out: stages.save_samples(path, out, self.pad_id),
        )

    def sft_samples(self) -> list[TokenIds]:
        """Samples of πθ(0) on the training prompts, generated once and cached (like an assistant's)."""
        path = wd.samples_path(self.workdir, "sft")
        return stages.load_or_make(
            stages.exists(path),
            lambda: stages.load_samples(path),
            lambda: self.samples(self.sft_policy(), "sft/samples", "sft samples"),
            lambda out: stages.save_samples(path, out, self.pad_id),
        )

    # --------------------------------------------------------------------------- ranked sets

    def _list_sources(self, mode: modes.Mode, t: int, policy_samples, prompts: np.ndarray | None) -> modes.ListSources:
        """What round t's lists are built from, for the training prompts `prompts` (None: all); `policy_samples`
        already samples those prompts only."""
        examples = self.data.train_examples
        ids = np.arange(len(examples)) if prompts is None else prompts
        pick = lambda xs: [xs[i] for i in ids]  # noqa: E731

        def grade(n: int, response: TokenIds) -> float:
            e = examples[ids[n]]
            return grade_answer(e.task, e.meta, self.tokenizer.decode(response, skip_special_tokens=True))

        return modes.ListSources(
            answers=pick(self.data.train_answer_ids),
            dataset_responses=pick(self.data.train_response_ids),
            assistant_samples=lambda i: pick(self.assistant_samples(i)),
            sft_samples=lambda: pick(self.sft_samples()),
            policy_samples=policy_samples,
            dataset_scores=pick([e.scores for e in examples]),
            grade=grade if self.data.heldout.checkable else None,
            answer_on_top=self.settings.answer_on_top,
            seed=seeds.stage_seed(self.settings.seed, f"{mode.name}/round_{t}/ties"),
        )

    def ranked_set(self, mode: modes.Mode, t: int, policy: Decoder, K: int) -> RankedSet:
        """Round t's ranked lists of `mode` (modes.MODES) with the reference log-probs of its mode."""
        path = wd.ranked_set_path(self.workdir, mode.name, t, mode.one_set)
        prompts = self.round_prompts(mode, t)

        def policy_samples(i: int) -> list[TokenIds]:
            # Sample 0 keeps the label self-play has always used; further draws get their own.
            label = f"{mode.name}/round_{t}/samples" + (f"_{i}" if i else "")
            # On screen rounds count from 1, as in the results table (files and metrics: round_<t>, from 0).
            desc = f"{mode.name} round {t + 1} samples" + (f" {i}" if i else "")
            return self.samples(policy, label, desc, prompts)

        def build() -> RankedSet:
            ranked = mode.build_lists(self._list_sources(mode, t, functools.cache(policy_samples), prompts), K)
            prompt_ids = self.data.train_prompt_ids
            if prompts is not None:
                prompt_ids = [prompt_ids[i] for i in prompts]
            lists = ranked_set(self.settings, self.pad_id, prompt_ids, ranked.lists, k=K)
            if mode.ranks_own_sample:  # a diagnostic: how often πθ(t) already gives the answer
                lists = lists.replace(policy_sample_correct_N=np.array([r[-1] == r[0] for r in ranked.lists], bool))
            if ranked.labels is not None:  # ratings or verifier scores: the pairwise losses weigh pairs by them
                lists = lists.replace(labels_NxK=ranked.labels)
            if mode.reference is modes.Reference.SFT:
                reference = self.sft_policy()
            elif mode.reference is modes.Reference.ROUND_POLICY:
                reference = policy
            else:
                raise ValueError(f"mode {mode.name!r} ranks lists but names no reference")
            with self.metric_log.timed(f"{mode.name}/round_{t}", "reference_scoring"):
                return lists.replace(ref_logps_NxK=self._score(reference, lists))

        return stages.load_or_make(
            stages.exists(path), lambda: load_ranked_set(path), build, lambda r: stages.save_ranked(path, r)
        )

    def _score(self, model: Decoder, lists: RankedSet) -> np.ndarray:
        return scoring.score_ranked(model, lists, self.settings.eval_batch_size, batch_type=self.settings.batch_type)

    def training_set(self, mode: modes.Mode, t: int, start: Decoder, K: int) -> RankedSet:
        """Round t's ranked set, joined by those of the `rounds.mix_previous` rounds before it.

        Round mixing (SPIN's authors: training on rounds t and t-1 together "works better than a
        single iteration"). With `rounds.mix_rescore` (default, as their code does: the trainer
        scores every list with the current reference) the earlier sets get reference log-probs of
        πθ(t); without it each keeps the log-probs of the policy that generated it."""
        own = self.ranked_set(mode, t, start, K)
        previous = range(max(0, t - self.settings.mix_previous), t)
        if mode.one_set or not previous:
            return own
        path = wd.mixed_set_path(self.workdir, mode.name, t)

        def earlier(s: int) -> RankedSet:
            try:
                return load_ranked_set(wd.ranked_set_path(self.workdir, mode.name, s))
            except DamagedFile:  # derived data: made again (and said so) from πθ(s), as round s made it
                return self.ranked_set(mode, s, self.round_start(mode, s), K)

        def build() -> RankedSet:
            sets = [earlier(s) for s in previous]
            if self.settings.mix_rescore:
                sets = [s.replace(ref_logps_NxK=self._score(start, s)) for s in sets]
            return concat_ranked_sets([*sets, own])

        return stages.load_or_make(
            stages.exists(path), lambda: load_ranked_set(path), build, lambda r: stages.save_ranked(path, r)
        )
