"""The self-play loop (docs/ARCHITECTURE.md): SFT -> assistants -> rounds of generate, rank, score, train.

What each mode ranks and against which reference is data (`pl_dpo.selfplay.modes`); this file
runs every stage once. Every stage is skipped when its output is already committed
(`stages.load_or_make`), so a killed run resumes where it stopped and ends with the same parameters.

Workdir layout (the paths are functions of pl_dpo.workdir.layout):

    config.json                  the first run's config (later runs must agree, agreement.WORKDIR_KEYS)
    tokenizer/                   built once when no tokenizer path is configured
    tfds/                        the built datasets (array_record)
    sft/policies/0               πθ(0)  (sft/train: its mid-phase state)
    sft/eval_0.json              πθ(0)'s held-out metrics and greedy answers
    sft/samples.npz              πθ(0)'s cached samples (mode triplet)
    assistant_<i>/policies/0     assistant i;  assistant_<i>/samples.npz: its cached samples
    <mode>/round_<t>/ranked.npz  round t's ranked set with reference log-probs (πθ(t))
                                 (a mode with one fixed set, offline: <mode>/ranked.npz)
    <mode>/round_<t>/mixed.npz   with rounds.mix_previous: that set and the previous rounds' sets
    <mode>/round_<t>/train       mid-round train state
    <mode>/policies/<t+1>        πθ(t+1);  <mode>/eval_<t+1>.json its metrics
    <mode>/hf_export/round_<t+1> πθ(t+1) as a Hugging Face folder (with export_hf)
    metrics.jsonl, tensorboard/  every step and every evaluation
    results.md, results.png      the evaluation table and its plot (pl_dpo.main)
    jax_cache/                   compiled programs, reused by later rounds and resumed runs

The workdir may be a gs:// bucket path: every file goes through etils.epath (pl_dpo.workdir.bucket).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from pl_dpo import config_lib, evaluate, scoring, sharding
from pl_dpo.data import concat_ranked_sets, grade_answer, load_ranked_set, tokenize_examples
from pl_dpo.models import Decoder, save_pretrained
from pl_dpo.selfplay import generation, modes, stages
from pl_dpo.selfplay.policies import PolicyStore
from pl_dpo.selfplay.run_data import RunData, TokenIds, prepare_data, ranked_arrays, run_tokenizer
from pl_dpo.tokenizer import load_tokenizer
from pl_dpo.training import phase, train
from pl_dpo.training.phase import PhaseSpec, train_phase
from pl_dpo.workdir import agreement, bucket
from pl_dpo.workdir import layout as wd
from pl_dpo.workdir.metric_log import MetricLog

log = logging.getLogger(__name__)


class SelfPlay:
    """Holds what every stage of a run shares: mesh, tokenizer, data, policies on disk, logs."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        # Orbax wants absolute paths (or gs:// URLs).
        self.config, self.workdir = config, wd.absolute(workdir)
        devices = jax.devices()[: config.mesh.get("num_devices", 0) or None]
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
        self.rules = sharding.DEFAULT_DECODER_RULES
        agreement.check_workdir_config(self.workdir, config, agreement.WORKDIR_KEYS)
        self.tokenizer = run_tokenizer(config, self.workdir)
        config_lib.check_vocab(config, len(self.tokenizer))
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.policies = PolicyStore(self.workdir, self.mesh, self.rules, vocab_size=len(self.tokenizer))
        self.metric_log = MetricLog(self.workdir)
        self.data: RunData = prepare_data(config, self.tokenizer, self.workdir, self.metric_log)
        self.table: list[dict[str, Any]] = []
        # The K responses of a list behind one copy of its prompt, in training, scoring and evaluation.
        self.pack_prompt = bool(config.data.get("pack_prompt", False))

    # --------------------------------------------------------------------------- models

    def restore_policy(self, lineage: str, model_cfg: ml_collections.ConfigDict, index: int) -> Decoder:
        return self.policies.restore(lineage, model_cfg, index)

    def _phase_spec(self, name: str, directory: str, **fields: Any) -> PhaseSpec:
        return PhaseSpec(
            name=name,
            directory=directory,
            save_every_steps=self.config.checkpoint.save_every_steps,
            length_buckets=tuple(self.config.data.get("length_buckets", ()) or ()) or None,
            pack_prompt=self.pack_prompt,
            **fields,
        )

    def supervised_model(
        self,
        lineage: str,
        model_cfg: ml_collections.ConfigDict,
        steps: int,
        optim: train.OptimizerConfig,
        batch_size: int,
        eval_every: int = 0,
        patience: int = 1,
    ) -> Decoder:
        """πθ(0) or an assistant: SFT on the dataset answers (or the model as loaded when steps == 0).

        With `eval_every`, `steps` is a maximum: SFT stops once `patience` readings of the held-out
        answers' log-likelihood in a row bring no new best (a converged start)."""
        seed = self.config.seed + zlib.crc32(lineage.encode()) % 1000
        saved = self.policies.saved(lineage, 0)
        if steps == 0 and lineage != "sft" and not saved:
            return self.policies.initial(model_cfg, seed)  # a pretrained assistant as is: its folder is its checkpoint

        def sft() -> Decoder:
            model = self.policies.initial(model_cfg, seed)
            if steps == 0:
                return model
            n = self.data.sft_arrays["tokens_NxKxL"].shape[0]
            spec = self._phase_spec(
                lineage,
                wd.lineage_dir(self.workdir, lineage),
                num_epochs=phase.epochs_for_steps(steps, n, batch_size),
                batch_size=batch_size,
                seed=seed,
                optim=optim,
                max_steps=steps,
                eval_every=eval_every,
                patience=patience,
            )
            objective = train.sft_objective(self.config.logprob_chunk)
            heldout, eval_batch = self.data.heldout, self.config.eval.batch_size
            return train_phase(
                model,
                self.data.sft_arrays,
                objective,
                spec,
                mesh=self.mesh,
                rules=self.rules,
                metric_log=self.metric_log,
                evaluate=lambda m: evaluate.answer_logp_per_token(m, heldout, eval_batch, pack_prompt=self.pack_prompt),
            )

        model = stages.load_or_make(
            saved,
            lambda: self.restore_policy(lineage, model_cfg, 0),
            sft,
            lambda model: self.policies.save(lineage, 0, model, {"lineage": lineage, "sft_steps": steps}),
        )
        self._drop_train_state(wd.lineage_dir(self.workdir, lineage))
        return model

    # --------------------------------------------------------------------------- evaluation

    def evaluate(self, lineage: str, index: int, model: Decoder, baseline) -> dict[str, Any]:
        """Held-out metrics of a policy, cached with the settings they were made with: a run
        with other evaluation settings (config.eval) evaluates again instead of mixing."""
        path = wd.eval_path(self.workdir, lineage, index)
        settings = {"eval": config_lib.plain(self.config.eval), "max_new_tokens": self.config.sampling.max_new_tokens}
        cached = stages.read_json(path) if stages.exists(path) else None

        def run_eval() -> dict[str, Any]:
            metrics, responses, correct = evaluate.evaluate_policy(
                model,
                self.data.heldout,
                self.tokenizer,
                batch_size=self.config.eval.batch_size,
                max_new_tokens=self.config.sampling.max_new_tokens,
                baseline=baseline,
                pack_prompt=self.pack_prompt,
            )
            return {
                "metrics": metrics,
                "responses": responses,
                "correct": None if correct is None else correct.tolist(),
                "settings": settings,
            }

        def save(result: dict[str, Any]) -> None:
            if cached is not None:  # evaluated again under new settings: the new record replaces the old
                self.metric_log.drop({f"eval/{lineage}": index})
            self.metric_log.write(f"eval/{lineage}", index, result["metrics"])
            stages.write_json(path, result)

        fresh = cached is not None and cached.get("settings") == settings
        result = stages.load_or_make(fresh, lambda: cached, run_eval, save)
        # Index 0 of the SFT lineage is the start of every arm; the control arm continues that lineage.
        name = "sft" if (lineage, index) == ("sft", 0) else f"{lineage} round {index}"
        row = {"policy": name, "arm": lineage, "round": index, **result["metrics"]}
        self.table.append(row)
        log.info("eval %s", row)
        return result

    # --------------------------------------------------------------------------- generation

    @contextlib.contextmanager
    def timed(self, stage: str, work: str) -> Iterator[None]:
        """Logs the wall time of `work` (generation, reference_scoring, training) of a stage to the metric
        log (phase `timing/<work>`), so a run says where its time went (`benchmarks/self_play_round.py`)."""
        start = time.perf_counter()
        yield
        self.metric_log.write(f"timing/{work}", 0, {"stage": stage, "seconds": time.perf_counter() - start})

    def samples(self, model: Decoder, label: str, desc: str, prompts: np.ndarray | None = None) -> list[TokenIds]:
        """One sampled response per training prompt (or per prompt of the indices `prompts`), the key drawn
        from `label`."""
        key = generation.stage_key(self.config.seed, label)
        arrays = self.data.sft_arrays
        if prompts is not None:
            arrays = {name: a[prompts] for name, a in arrays.items()}
            arrays["example_ids_N"] = np.arange(len(prompts))  # responses come back in the subset's order
        with self.timed(label, "generation"):
            return generation.sample_responses(
                model,
                arrays,
                self.config.sampling,
                key,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                desc=desc,
            )

    def _foreign_samples(self, index: int, model: Decoder, tokenizer_path: str) -> list[TokenIds]:
        """Samples of an assistant with its own tokenizer: prompts in its chat template,
        answers decoded to text and tokenised again with the policy's tokenizer."""
        tok = load_tokenizer(tokenizer_path)
        arrays, _ = tokenize_examples(tok, self.data.train_examples, self.data.tokenize, k=1)
        key = generation.stage_key(self.config.seed, f"assistant_{index}/samples")
        ids = generation.sample_responses(
            model,
            arrays,
            self.config.sampling,
            key,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            desc=f"assistant_{index} samples",
        )
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in ids]
        return generation.retokenise(texts, self.data.train_examples, self.tokenizer, self.data.tokenize, self.eos_id)

    def assistant_samples(self, index: int) -> list[TokenIds]:
        """Samples of assistant `index` on the training prompts, generated once and cached."""
        lineage = f"assistant_{index}"
        path = wd.samples_path(self.workdir, lineage)

        def generate() -> list[TokenIds]:
            a = self.config.assistants[index]
            model = self.supervised_model(lineage, a.model, a.sft_steps, config_lib.optimizer(a.optim), a.batch_size)
            if a.get("tokenizer_path"):
                return self._foreign_samples(index, model, a.tokenizer_path)
            return self.samples(model, f"{lineage}/samples", f"{lineage} samples")

        return stages.load_or_make(
            stages.exists(path),
            lambda: stages.unpack_responses(load_ranked_set(path)),
            generate,
            lambda out: stages.save_npz(path, stages.pack_responses(out, self.pad_id)),
        )

    def sft_samples(self) -> list[TokenIds]:
        """Samples of πθ(0) on the training prompts, generated once and cached (like an assistant's)."""
        path = wd.samples_path(self.workdir, "sft")

        def generate() -> list[TokenIds]:
            sft = self.restore_policy("sft", self.config.model, 0)
            return self.samples(sft, "sft/samples", "sft samples")

        return stages.load_or_make(
            stages.exists(path),
            lambda: stages.unpack_responses(load_ranked_set(path)),
            generate,
            lambda out: stages.save_npz(path, stages.pack_responses(out, self.pad_id)),
        )

    def round_prompts(self, mode: modes.Mode, t: int) -> np.ndarray | None:
        """The training prompts round t of `mode` ranks: all of them (None), or with `rounds.prompts_per_round`
        a random subset of that many, drawn from the seed, the mode and the round (sorted). It sets an arm's
        generation budget, e.g. K samples of N/K prompts per round against SPIN's one sample of N."""
        p = int(self.config.rounds.get("prompts_per_round", 0) or 0)
        n = len(self.data.train_prompt_ids)
        if not p or mode.one_set:
            return None
        if p > n:
            raise config_lib.ConfigError(f"config.rounds.prompts_per_round={p} exceeds the {n} training prompts")
        rng = np.random.default_rng(self.config.seed + zlib.crc32(f"{mode.name}/round_{t}/prompts".encode()))
        return np.sort(rng.choice(n, p, replace=False))

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
            grade=grade if self.config.data.source == "synthetic" else None,
            answer_on_top=bool(self.config.rounds.get("answer_on_top", False)),
            seed=self.config.seed + zlib.crc32(f"{mode.name}/round_{t}/ties".encode()),
        )

    def ranked_set(self, mode: modes.Mode, t: int, policy: Decoder, K: int) -> dict[str, np.ndarray]:
        """Round t's ranked lists of `mode` (modes.MODES) with the reference log-probs of its mode."""
        path = wd.ranked_set_path(self.workdir, mode.name, t, mode.one_set)
        prompts = self.round_prompts(mode, t)

        def policy_samples(i: int) -> list[TokenIds]:
            # Sample 0 keeps the label self-play has always used; further draws get their own.
            label = f"{mode.name}/round_{t}/samples" + (f"_{i}" if i else "")
            # On screen rounds count from 1, as in the results table (files and metrics: round_<t>, from 0).
            desc = f"{mode.name} round {t + 1} samples" + (f" {i}" if i else "")
            return self.samples(policy, label, desc, prompts)

        def build() -> dict[str, np.ndarray]:
            ranked = mode.build_lists(self._list_sources(mode, t, functools.cache(policy_samples), prompts), K)
            prompt_ids = self.data.train_prompt_ids
            if prompts is not None:
                prompt_ids = [prompt_ids[i] for i in prompts]
            arrays = ranked_arrays(self.config, self.pad_id, prompt_ids, ranked.lists, k=K)
            if mode.ranks_own_sample:  # a diagnostic: how often πθ(t) already gives the answer
                arrays["policy_sample_correct_N"] = np.array([lst[-1] == lst[0] for lst in ranked.lists], bool)
            if ranked.labels is not None:  # ratings or verifier scores: the pairwise losses weigh pairs by them
                arrays["labels_NxK"] = ranked.labels
            if mode.reference is modes.Reference.SFT:
                reference = self.restore_policy("sft", self.config.model, 0)
            elif mode.reference is modes.Reference.ROUND_POLICY:
                reference = policy
            else:
                raise ValueError(f"mode {mode.name!r} ranks lists but names no reference")
            with self.timed(f"{mode.name}/round_{t}", "reference_scoring"):
                arrays["ref_logps_NxK"] = scoring.score_ranked(
                    reference, arrays, self.config.eval.batch_size, pack_prompt=self.pack_prompt
                )
            return arrays

        return stages.load_or_make(
            stages.exists(path), lambda: load_ranked_set(path), build, lambda a: stages.save_npz(path, a)
        )

    def training_set(self, mode: modes.Mode, t: int, start: Decoder, K: int) -> dict[str, np.ndarray]:
        """Round t's ranked set, joined by those of the `rounds.mix_previous` rounds before it.

        Round mixing (SPIN's authors: training on rounds t and t-1 together "works better than a
        single iteration"). With `rounds.mix_rescore` (default, as their code does: the trainer
        scores every list with the current reference) the earlier sets get reference log-probs of
        πθ(t); without it each keeps the log-probs of the policy that generated it."""
        own = self.ranked_set(mode, t, start, K)
        previous = range(max(0, t - int(self.config.rounds.get("mix_previous", 0) or 0)), t)
        if mode.one_set or not previous:
            return own
        path = wd.mixed_set_path(self.workdir, mode.name, t)

        def build() -> dict[str, np.ndarray]:
            sets = [load_ranked_set(wd.ranked_set_path(self.workdir, mode.name, s)) for s in previous]
            if self.config.rounds.get("mix_rescore", True):
                bs = self.config.eval.batch_size
                sets = [
                    dict(a, ref_logps_NxK=scoring.score_ranked(start, a, bs, pack_prompt=self.pack_prompt))
                    for a in sets
                ]
            return concat_ranked_sets([*sets, own])

        return stages.load_or_make(
            stages.exists(path), lambda: load_ranked_set(path), build, lambda a: stages.save_npz(path, a)
        )

    # --------------------------------------------------------------------------- the loop

    def _sft_start(self) -> evaluate.SftBaseline:
        """πθ(0): trained (or restored), evaluated, and turned into the reference lists of
        every later evaluation. Its weights are not kept: rounds restore them when needed."""
        c = self.config
        sft = self.supervised_model(
            "sft",
            c.model,
            c.sft.steps,
            config_lib.optimizer(c.sft.optim),
            c.sft.batch_size,
            eval_every=c.sft.get("eval_every", 0),
            patience=c.sft.get("patience", 1),
        )
        sft_eval = self.evaluate("sft", 0, sft, baseline=None)
        correct = None if sft_eval["correct"] is None else np.array(sft_eval["correct"])
        return evaluate.sft_baseline(
            sft,
            self.data.heldout,
            sft_eval["responses"],
            correct,
            pad_id=self.pad_id,
            batch_size=c.eval.batch_size,
            pack_prompt=self.pack_prompt,
        )

    def _train_round(self, mode: modes.Mode, t: int, K: int) -> Decoder:
        """Round t of an arm: its lists (or the dataset answers) and reference, then training from πθ(t)."""
        c = self.config
        # A fresh restore: training donates the buffers of the model it starts from.
        start = self.restore_policy(*(("sft", c.model, 0) if t == 0 else (mode.name, c.model, t)))
        if mode.objective is modes.Objective.SFT:
            arrays, objective = self.data.sft_arrays, train.sft_objective(c.logprob_chunk)
        else:
            arrays = self.training_set(mode, t, start, K)
            objective = train.pl_dpo_objective(config_lib.loss(c.loss), c.logprob_chunk)
        optim = config_lib.optimizer(c.rounds.optim)
        if c.rounds.get("lr_per_round"):
            optim = dataclasses.replace(optim, lr=float(c.rounds.lr_per_round[t]))
        spec = self._phase_spec(
            f"{mode.name}/round_{t}",
            wd.round_dir(self.workdir, mode.name, t),
            num_epochs=c.rounds.epochs,
            batch_size=c.rounds.batch_size,
            seed=c.seed + 7919 * (t + 1),
            optim=optim,
            max_steps=c.rounds.get("max_steps") or None,
            label=f"{mode.name} round {t + 1}",
        )
        with self.timed(spec.name, "training"):
            return train_phase(
                start, arrays, objective, spec, mesh=self.mesh, rules=self.rules, metric_log=self.metric_log
            )

    def round_policy(self, mode: modes.Mode, t: int, K: int) -> Decoder:
        """πθ(t+1) of an arm: restored if round t is done, else round t is run."""
        policy = stages.load_or_make(
            self.policies.saved(mode.name, t + 1),
            lambda: self.restore_policy(mode.name, self.config.model, t + 1),
            lambda: self._train_round(mode, t, K),
            lambda policy: self.policies.save(mode.name, t + 1, policy, {"mode": mode.name, "round": t + 1, "K": K}),
        )
        self._drop_train_state(wd.round_dir(self.workdir, mode.name, t))
        return policy

    def _drop_train_state(self, phase_dir: str) -> None:
        """Deletes a phase's mid-phase train states once its policy is committed (a 7B float32 RMSprop
        state is ~112 GB); `checkpoint.keep_train_state` keeps them. Also after a run killed between
        the commit and the deletion: the next run deletes them when it restores the policy."""
        train_dir = epath.Path(wd.train_state_dir(phase_dir))
        if (
            not self.config.checkpoint.get("keep_train_state", False)
            and jax.process_index() == 0
            and train_dir.exists()
        ):
            train_dir.rmtree()

    def _export(self, mode: modes.Mode, index: int, policy: Decoder) -> None:
        """πθ(index) as a Hugging Face folder `<mode>/hf_export/round_<index>` (lm-eval, vLLM)."""
        out = wd.export_dir(self.workdir, mode.name, index)
        if jax.process_index() == 0 and not stages.exists(os.path.join(out, "config.json")):
            with bucket.staged_folder(out, marker="config.json") as folder:  # a local folder, uploaded to a bucket
                save_pretrained(policy, folder)
                self.tokenizer.save_pretrained(folder)

    def run(self) -> list[dict[str, Any]]:
        """Every arm of the config, round after round; returns the evaluation table."""
        c = self.config
        try:
            baseline = self._sft_start()
            for mode in config_lib.modes_of(c):
                K = config_lib.list_size(c, mode)
                for t in range(c.rounds.num):
                    policy = self.round_policy(mode, t, K)
                    self.evaluate(mode.name, t + 1, policy, baseline)
                    if c.get("export_hf"):
                        self._export(mode, t + 1, policy)
                    del policy  # one policy in memory at a time
        finally:
            self.metric_log.close()
        return self.table
