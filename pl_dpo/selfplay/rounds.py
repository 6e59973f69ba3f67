"""The self-play loop (docs/ARCHITECTURE.md): SFT -> assistants -> rounds of generate, rank, score, train.

What each mode ranks and against which reference is data (`pl_dpo.selfplay.modes`); this file
runs every stage once. Every stage is skipped when its output is already committed
(`stages.load_or_make`), so a killed run resumes where it stopped and ends with the same parameters.

Building a round's ranked set is `ranked_sets.RankedSets`'s; this file keeps the SFT start (πθ(0) and the
assistants), the round policy and the loop over rounds. Where each output lives: `pl_dpo.workdir.layout`.
The workdir may be a gs:// bucket path: every file goes through etils.epath (pl_dpo.workdir.bucket).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from pl_dpo import config_lib, evaluate, sharding
from pl_dpo.decode_layout import ModelFolder
from pl_dpo.harness import run as harness_run
from pl_dpo.models import Decoder, lora, peft_io, save_pretrained
from pl_dpo.selfplay import modes, seeds, stages
from pl_dpo.selfplay.policies import PolicyStore
from pl_dpo.selfplay.ranked_sets import RankedSets
from pl_dpo.selfplay.run_data import RunData, prepare_data, run_tokenizer
from pl_dpo.settings import PhaseSettings
from pl_dpo.training import phase as phase_lib
from pl_dpo.training import train
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
        self.settings = s = config_lib.run_settings(config)
        m = config.mesh
        self.mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[: m.num_devices or None])
        self.rules = sharding.DEFAULT_DECODER_RULES
        agreement.check_workdir_config(self.workdir, config, agreement.WORKDIR_KEYS)
        self.tokenizer = run_tokenizer(config, self.workdir)
        config_lib.check_vocab(config, len(self.tokenizer))
        harness_run.check_chat_template(s.harness, self.tokenizer)  # a ConfigError: one line, exit 2
        self.policies = PolicyStore(self.workdir, self.mesh, self.rules, vocab_size=len(self.tokenizer))
        self.metric_log = MetricLog(self.workdir)
        self.data: RunData = prepare_data(config, self.tokenizer, self.workdir, self.metric_log)
        self.table: list[dict[str, Any]] = []
        sampling = config_lib.sampling(
            config.sampling,
            eos_ids=(self.tokenizer.eos_token_id,),
            pad_id=self.tokenizer.pad_token_id,
            int8=config_lib.sample_int8(config.model),
            num_ids=len(self.tokenizer),
        )
        self.sets = RankedSets(
            self.workdir,
            s,
            sampling,
            self.data,
            self.tokenizer,
            self.metric_log,
            assistant=self.assistant,
            assistant_tokenizers=tuple(config_lib.foreign_tokenizer(a) for a in config.assistants),
            assistant_int8=tuple(config_lib.sample_int8(a.model) for a in config.assistants),
            sft_policy=lambda: self.policies.restore("sft", config.model, 0),
            round_start=self.round_start,
        )

    # --------------------------------------------------------------------------- SFT: πθ(0) and the assistants

    def _phase_spec(self, name: str, directory: str, phase: PhaseSettings, **fields: Any) -> PhaseSpec:
        s = self.settings
        return PhaseSpec(
            name=name,
            directory=directory,
            batch_size=phase.batch_size,
            save_every_steps=s.save_every_steps,
            length_buckets=s.length_buckets,
            batch_type=s.batch_type,
            eval_every=phase.eval_every,
            patience=phase.patience,
            **fields,
        )

    def supervised_model(self, lineage: str, model_cfg: ml_collections.ConfigDict, phase: PhaseSettings) -> Decoder:
        """πθ(0) or an assistant: SFT on the dataset answers (or the model as loaded when phase.steps == 0).

        With `phase.eval_every`, `phase.steps` is a maximum: SFT stops once `phase.patience` readings of the
        held-out answers' log-likelihood in a row bring no new best (a converged start)."""
        s, steps = self.settings, phase.steps
        seed = seeds.sft_seed(s.seed, lineage)
        saved = self.policies.saved(lineage, 0)
        adapter, init_adapter = config_lib.lora(model_cfg), config_lib.init_adapter(model_cfg)

        def initial() -> Decoder:
            """The model as loaded (or created), with the PEFT adapter it starts from."""
            model = self.policies.initial(model_cfg, seed)
            if init_adapter:
                peft_io.load_peft_adapter(model, init_adapter, sharding.placement(self.mesh, self.rules))
            return model

        def sft() -> Decoder:
            model = initial()
            if steps == 0:
                return lora.merge(model)
            spec = self._phase_spec(
                lineage,
                wd.lineage_dir(self.workdir, lineage),
                phase,
                num_epochs=phase_lib.epochs_for_steps(steps, self.data.sft_set.num_lists, phase.batch_size),
                seed=seed,
                optim=phase.optim,
                max_steps=steps,
                lora=adapter,
            )
            heldout = self.data.heldout
            trained = train_phase(
                model,
                self.data.sft_set,
                train.sft_objective(s.logprob_chunk),
                spec,
                mesh=self.mesh,
                rules=self.rules,
                metric_log=self.metric_log,
                heldout_score=lambda m: evaluate.answer_logp_per_token(
                    m, heldout, s.eval_batch_size, batch_type=s.batch_type
                ),
            )
            base = model_cfg.hf_path or f"preset {model_cfg.preset} (seed {seed})"
            return self._merged(spec, trained, base, lambda: self.policies.initial(model_cfg, seed))

        model = stages.load_or_make(
            saved,
            lambda: self.policies.restore(lineage, model_cfg, 0),
            sft,
            lambda model: self.policies.save(lineage, 0, model, {"lineage": lineage, "sft_steps": steps}),
        )
        self._drop_train_state(wd.lineage_dir(self.workdir, lineage))
        return model

    def assistant(self, index: int) -> Decoder | ModelFolder:
        """Assistant `index` (config.assistants): trained by SFT once, or its pretrained folder as is. An assistant
        is only sampled: used as shipped, its folder is read straight into the sampler's layout (one copy)."""
        section = self.config.assistants[index]
        if config_lib.used_as_shipped(section):
            decoder = config_lib.model_config(section.model, self.policies.vocab_size)
            return ModelFolder(section.model.hf_path, decoder, self.mesh)
        return self.supervised_model(f"assistant_{index}", section.model, config_lib.sft_phase(section))

    # --------------------------------------------------------------------------- evaluation

    def evaluated(self, lineage: str, index: int, model: Decoder, baseline) -> dict[str, Any]:
        """Held-out metrics of a policy (`evaluate.evaluate_policy`), cached with the settings they were made
        with: a run with other evaluation settings (config.eval) evaluates again instead of mixing. The
        metrics join the results table."""
        s = self.settings
        path = wd.eval_path(self.workdir, lineage, index)
        settings = s.eval_record
        cached = stages.read_json(path) if stages.exists(path) else None

        def run_eval() -> dict[str, Any]:
            metrics, responses, correct = evaluate.evaluate_policy(
                model,
                self.data.heldout,
                self.tokenizer,
                batch_size=s.eval_batch_size,
                max_new_tokens=self.sets.sampling.max_new_tokens,
                baseline=baseline,
                batch_type=s.batch_type,
            )
            if s.harness is not None:  # lm-evaluation-harness tasks on the same policy, in memory (config.eval.harness)
                log.info("harness tasks %s on %s %d", ",".join(s.harness.tasks), lineage, index)
                scores = harness_run.scores(model, self.tokenizer, s.harness, seed=s.seed)
                metrics.update({f"harness/{name}": value for name, value in scores.items()})
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

    # --------------------------------------------------------------------------- the loop

    def _sft_start(self) -> evaluate.SftBaseline:
        """πθ(0): trained (or restored), evaluated, and turned into the reference lists of
        every later evaluation. Its weights are not kept: rounds restore them when needed."""
        s = self.settings
        sft = self.supervised_model("sft", self.config.model, s.sft)
        sft_eval = self.evaluated("sft", 0, sft, baseline=None)
        correct = None if sft_eval["correct"] is None else np.array(sft_eval["correct"])
        return evaluate.sft_baseline(
            sft,
            self.data.heldout,
            sft_eval["responses"],
            correct,
            pad_id=self.tokenizer.pad_token_id,
            batch_size=s.eval_batch_size,
            batch_type=s.batch_type,
        )

    def round_start(self, mode: modes.Mode, t: int) -> Decoder:
        """πθ(t), the policy round t of an arm starts from, restored afresh (training donates its buffers)."""
        return self.policies.restore(*(("sft", self.config.model, 0) if t == 0 else (mode.name, self.config.model, t)))

    def _train_round(self, mode: modes.Mode, t: int, K: int) -> Decoder:
        """Round t of an arm: its lists (or the dataset answers) and reference, then training from πθ(t)."""
        s = self.settings
        start = self.round_start(mode, t)
        if mode.objective is modes.Objective.SFT:
            lists, objective = self.data.sft_set, train.sft_objective(s.logprob_chunk)
        else:
            lists = self.sets.training_set(mode, t, start, K)
            objective = train.pl_dpo_objective(s.loss, s.logprob_chunk)
        spec = self._phase_spec(
            f"{mode.name}/round_{t}",
            wd.round_dir(self.workdir, mode.name, t),
            s.rounds,
            num_epochs=s.rounds.epochs,
            seed=seeds.round_seed(s.seed, t),
            optim=s.rounds.round_optim(t),
            max_steps=s.rounds.max_steps,
            label=f"{mode.name} round {t + 1}",
            lora=config_lib.lora(self.config.model),
        )
        with self.metric_log.timed(spec.name, "training"):
            trained = train_phase(
                start, lists, objective, spec, mesh=self.mesh, rules=self.rules, metric_log=self.metric_log
            )
        base = (
            wd.export_dir(self.workdir, mode.name, t)
            if s.export_hf and t > 0
            else os.path.join(wd.policies_dir(self.workdir, "sft" if t == 0 else mode.name), str(t))
        )
        return self._merged(spec, trained, base, lambda: self.round_start(mode, t))

    def _merged(self, spec: PhaseSpec, model: Decoder, base: str, start: Callable[[], Decoder]) -> Decoder:
        """The policy of a phase: with LoRA, its adapters are first written as a PEFT folder `<phase>/adapter`
        (`base`: where the weights they adapt are), then merged into the weights; else the model as trained.
        With `frozen_int8` the model trained on int8 kernels: the adapters go onto `start()`, the phase's start
        policy in full precision again, and are merged there (the quantization error is not kept)."""
        if spec.lora is None:
            return model
        out = wd.adapter_dir(spec.directory)
        tensors = peft_io.adapter_tensors(model)  # every process: gathering is collective
        if jax.process_index() == 0 and not stages.exists(os.path.join(out, peft_io.CONFIG_FILE)):
            with bucket.staged_folder(out, marker=peft_io.CONFIG_FILE) as folder:
                peft_io.write_peft_adapter(folder, tensors, spec.lora, base)
        if spec.lora.frozen_int8:
            model = lora.put_on(start(), lora.adapters(model))
        return lora.merge(model)

    def round_policy(self, mode: modes.Mode, t: int, K: int) -> Decoder:
        """πθ(t+1) of an arm: restored if round t is done, else round t is run."""
        policy = stages.load_or_make(
            self.policies.saved(mode.name, t + 1),
            lambda: self.policies.restore(mode.name, self.config.model, t + 1),
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
        if not self.settings.keep_train_state and jax.process_index() == 0 and train_dir.exists():
            train_dir.rmtree()

    def _export(self, mode: modes.Mode, index: int, policy: Decoder) -> None:
        """πθ(index) as a Hugging Face folder `<mode>/hf_export/round_<index>` (lm-eval, vLLM)."""
        out = wd.export_dir(self.workdir, mode.name, index)
        if jax.process_index() == 0 and not stages.exists(os.path.join(out, "config.json")):
            with bucket.staged_folder(out, marker="config.json") as folder:  # a local folder, uploaded to a bucket
                save_pretrained(policy, folder)
                self.tokenizer.save_pretrained(folder)

    def train_state_bytes(self) -> int:
        """The bytes of the largest thing a run saves (what a full disk needs before the first save): a train-state
        checkpoint of the policy, its weights and AdamW's two moments; with LoRA, whose train states hold the
        small adapters, a policy."""
        _, state = self.policies.abstract(self.config.model)
        copies = 1 if config_lib.lora(self.config.model) else 3
        return copies * sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))

    def run(self) -> list[dict[str, Any]]:
        """Every arm of the config, round after round; returns the evaluation table."""
        with self.metric_log:  # closed at the end, and after an error without hiding it
            baseline = self._sft_start()
            for mode, K in self.settings.arms:
                for t in range(self.settings.num_rounds):
                    policy = self.round_policy(mode, t, K)
                    self.evaluated(mode.name, t + 1, policy, baseline)
                    if self.settings.export_hf:
                        self._export(mode, t + 1, policy)
                    del policy  # one policy in memory at a time
        return self.table
