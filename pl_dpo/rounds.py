"""The self-play loop (DESIGN.md §2): SFT -> assistants -> rounds of generate, rank, score, train.

Workdir layout (every stage is skipped when its output is already committed, so a
killed run resumes where it stopped and ends with the same parameters):

    config.json                  the first run's config (later runs must agree, config_lib.WORKDIR_KEYS)
    tokenizer/                   built once when no tokenizer path is configured
    sft/policies/0               πθ(0)  (sft/train: its mid-phase state)
    sft/eval_0.json              πθ(0)'s held-out metrics and greedy answers
    assistant_<i>/policies/0     assistant i;  assistant_<i>/samples.npz: its cached samples
    <mode>/round_<t>/ranked.npz  round t's ranked set with reference log-probs (πθ(t))
                                 (mode "sft", the control arm, trains on the dataset answers instead)
    <mode>/round_<t>/train       mid-round train state
    <mode>/policies/<t+1>        πθ(t+1);  <mode>/eval_<t+1>.json its metrics
    <mode>/hf_export/round_<t+1> πθ(t+1) as a Hugging Face folder (with export_hf)
    metrics.jsonl, tensorboard/  every step and every evaluation
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from pl_dpo import checkpoint, config_lib, evaluate, sampler, sharding, train
from pl_dpo.data import TokenizeConfig, assemble_ranked, load_ranked_set, load_split, save_ranked_set, tokenize_examples
from pl_dpo.data.tokenize import encode_examples
from pl_dpo.metric_log import MetricLog
from pl_dpo.models import Decoder, save_pretrained
from pl_dpo.phase import PhaseSpec, train_phase
from pl_dpo.policies import PolicyStore
from pl_dpo.tokenizer import build_tiny_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def _rng(seed: int, *labels: Any) -> jax.Array:
    """A key derived from the seed and a stage label (stable across runs and processes)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(map(str, labels)).encode()))


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # atomic: a reader sees all of it or nothing


def _read_json(path: str) -> Any | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class SelfPlay:
    """Holds what every stage of a run shares: mesh, tokenizer, data, logs."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        # Orbax wants absolute paths.
        self.config, self.workdir = config, os.path.abspath(workdir)
        workdir = self.workdir
        devices = jax.devices()[: config.mesh.get("num_devices", 0) or None]
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
        self.rules = sharding.DEFAULT_DECODER_RULES
        checkpoint.check_workdir_config(workdir, config, config_lib.WORKDIR_KEYS)
        self.tokenizer = self._tokenizer()
        self.policies = PolicyStore(workdir, self.mesh, self.rules, vocab_size=len(self.tokenizer))
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.tok_cfg = TokenizeConfig(
            max_prompt_len=config.data.max_prompt_len, max_response_len=config.data.max_response_len
        )
        self.train_examples = self._load("train", config.data.get("num_train"))
        test = self._load("test", config.eval.num_prompts)
        self.metric_log = MetricLog(workdir)
        # Tokenised once: prompt ids and ranked response ids (+EOS), truncated and counted.
        self.train_prompt_ids, self.train_response_ids = self._encode("train", self.train_examples)
        self.train_answer_ids = [r[0] for r in self.train_response_ids]
        self.sft_arrays = self._arrays(self.train_prompt_ids, [r[:1] for r in self.train_response_ids], k=1)
        test_prompts, test_responses = self._encode("test", test)
        self.heldout = evaluate.HeldOut(
            examples=test,
            arrays=self._arrays(test_prompts, [r[:1] for r in test_responses], k=1),
            prompt_ids=test_prompts,
            answer_ids=[r[0] for r in test_responses],
            checkable=config.data.source == "synthetic",
        )
        self.table: list[dict[str, Any]] = []

    # --------------------------------------------------------------------------- inputs

    def _tokenizer(self):
        # A configured folder, else the model's own folder, else a tiny one built once.
        path = self.config.tokenizer.get("path") or self.config.model.get("hf_path")
        if path:
            return load_tokenizer(path)
        path = os.path.join(self.workdir, "tokenizer")
        if not os.path.exists(os.path.join(path, "tokenizer.json")) and jax.process_index() == 0:
            build_tiny_tokenizer(path, vocab_size=self.config.tokenizer.vocab_size)
        sharding.sync_processes("tokenizer")  # the others read what process 0 wrote
        return load_tokenizer(path)

    def _load(self, split: str, limit: int | None):
        data = self.config.data
        options = dict(data.get("options", {}) or {})
        files = {name: path for name, path in dict(data.get("files", {}) or {}).items() if path} or None
        examples = load_split(
            data.source,
            split,
            data_dir=os.path.join(self.workdir, "tfds"),
            files=files,
            skip_bad_rows=data.get("skip_bad_rows", False),
            **options,
        )
        return examples[:limit] if limit else examples

    def _length_buckets(self) -> tuple[int, ...] | None:
        return tuple(self.config.data.get("length_buckets", ()) or ()) or None

    def _encode(self, split: str, examples) -> tuple[list[list[int]], list[list[list[int]]]]:
        prompt_ids, response_ids, stats = encode_examples(self.tokenizer, examples, self.tok_cfg)
        summary = stats.summary()
        self.metric_log.write(f"data/{split}", 0, summary)
        if stats.prompts_truncated or stats.responses_truncated:
            log.warning(
                "%s: truncated %d prompts and %d responses (data.max_prompt_len / max_response_len)",
                split,
                stats.prompts_truncated,
                stats.responses_truncated,
            )
        return prompt_ids, response_ids

    def _arrays(self, prompt_ids, response_ids, k: int) -> dict[str, np.ndarray]:
        """The fixed-shape layout (L = max prompt + max response) shared by every round."""
        data = self.config.data
        return assemble_ranked(
            prompt_ids,
            response_ids,
            pad_id=self.pad_id,
            k=k,
            seq_len=data.max_prompt_len + data.max_response_len,
            prompt_len=data.max_prompt_len,
        )

    # --------------------------------------------------------------------------- models

    def restore_policy(self, lineage: str, model_cfg: ml_collections.ConfigDict, index: int) -> Decoder:
        return self.policies.restore(lineage, model_cfg, index)

    def supervised_model(
        self, lineage: str, model_cfg: ml_collections.ConfigDict, steps: int, optim, batch_size: int
    ) -> Decoder:
        """πθ(0) or an assistant: SFT on the dataset answers (or the model as loaded when steps == 0)."""
        if self.policies.saved(lineage, 0):
            return self.restore_policy(lineage, model_cfg, 0)
        seed = self.config.seed + zlib.crc32(lineage.encode()) % 1000
        model = self.policies.initial(model_cfg, seed)
        if steps == 0 and lineage != "sft":
            return model  # a pretrained assistant used as is: its folder is its checkpoint
        if steps > 0:
            n = self.sft_arrays["tokens_NxKxL"].shape[0]
            epochs = -(-steps * batch_size // n)
            spec = PhaseSpec(
                name=lineage,
                directory=os.path.join(self.workdir, lineage),
                num_epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                optim=optim,
                save_every_steps=self.config.checkpoint.save_every_steps,
                max_steps=steps,
                length_buckets=self._length_buckets(),
            )
            model = train_phase(
                model,
                self.sft_arrays,
                train.sft_objective(self.config.logprob_chunk),
                spec,
                mesh=self.mesh,
                rules=self.rules,
                metric_log=self.metric_log,
            )
        self.policies.save(lineage, 0, model, {"lineage": lineage, "sft_steps": steps})
        return model

    # --------------------------------------------------------------------------- evaluation

    def evaluate(self, lineage: str, index: int, model: Decoder, baseline) -> dict[str, Any]:
        path = os.path.join(self.workdir, lineage, f"eval_{index}.json")
        cached = _read_json(path)
        if cached is None:
            metrics, responses, correct = evaluate.evaluate_policy(
                model,
                self.heldout,
                self.tokenizer,
                batch_size=self.config.eval.batch_size,
                max_new_tokens=self.config.sampling.max_new_tokens,
                baseline=baseline,
            )
            cached = {
                "metrics": metrics,
                "responses": responses,
                "correct": None if correct is None else correct.tolist(),
            }
            self.metric_log.write(f"eval/{lineage}", index, metrics)
            _write_json(path, cached)
        name = "sft" if (lineage, index) == ("sft", 0) else f"{lineage} round {index}"
        row = {"policy": name, **cached["metrics"]}
        self.table.append(row)
        log.info("eval %s", row)
        return cached

    # --------------------------------------------------------------------------- generation

    def samples(
        self,
        model: Decoder,
        label: str,
        progress_desc: str,
        arrays: dict[str, np.ndarray] | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> list[list[int]]:
        """One sampled response per training prompt (default: the policy's tokenisation)."""
        s = self.config.sampling
        eos_id = self.eos_id if eos_id is None else eos_id
        cfg = sampler.SamplingConfig(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            eos_ids=(eos_id,),
            pad_id=self.pad_id if pad_id is None else pad_id,
        )
        with tqdm(
            total=len(self.train_prompt_ids),
            desc=progress_desc,
            unit="prompt",
            leave=False,
            disable=jax.process_index() != 0,
        ) as bar:
            return evaluate.generate_responses(
                model,
                self.sft_arrays if arrays is None else arrays,
                cfg,
                _rng(self.config.seed, label),
                s.batch_size,
                eos_id,
                progress=bar,
            )

    def _foreign_samples(self, index: int, model: Decoder, tokenizer_path: str) -> list[list[int]]:
        """Samples of an assistant with its own tokenizer: prompts in its chat template,
        answers decoded to text and tokenised again with the policy's tokenizer."""
        tok = load_tokenizer(tokenizer_path)
        arrays, _ = tokenize_examples(tok, self.train_examples, self.tok_cfg, k=1)
        ids = self.samples(
            model,
            f"assistant_{index}/samples",
            f"assistant_{index} samples",
            arrays=arrays,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
        )
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in ids]
        out = []
        for example, text in zip(self.train_examples, texts):
            if not text:  # an empty answer is still a (bad) answer: EOS alone
                out.append([self.eos_id])
                continue
            retokenised = dataclasses.replace(example, responses=(text,))
            out.append(encode_examples(self.tokenizer, [retokenised], self.tok_cfg)[1][0][0])
        return out

    def assistant_samples(self, index: int) -> list[list[int]]:
        """Samples of assistant `index` on the training prompts, generated once and cached."""
        lineage = f"assistant_{index}"
        path = os.path.join(self.workdir, lineage, "samples.npz")
        if os.path.exists(path):
            z = load_ranked_set(path)
            return [row[:n].tolist() for row, n in zip(z["tokens"], z["lengths"])]
        a = self.config.assistants[index]
        model = self.supervised_model(lineage, a.model, a.sft_steps, a.optim, a.batch_size)
        if a.get("tokenizer_path"):
            out = self._foreign_samples(index, model, a.tokenizer_path)
        else:
            out = self.samples(model, f"{lineage}/samples", f"{lineage} samples")
        width = max(len(r) for r in out)
        tokens = np.full((len(out), width), self.pad_id, np.int32)
        for i, r in enumerate(out):
            tokens[i, : len(r)] = r
        if jax.process_index() == 0:
            save_ranked_set(path, {"tokens": tokens, "lengths": np.array([len(r) for r in out], np.int32)})
        return out

    def ranked_set(self, mode: str, t: int, policy: Decoder, K: int) -> dict[str, np.ndarray]:
        """Round t's ranked lists [answer, assistants..., πθ(t) sample] with reference log-probs."""
        # Offline lists (and their fixed reference) do not change between rounds: one set.
        round_dir = (
            os.path.join(self.workdir, mode) if mode == "offline" else os.path.join(self.workdir, mode, f"round_{t}")
        )
        path = os.path.join(round_dir, "ranked.npz")
        if os.path.exists(path):
            return load_ranked_set(path)
        if mode == "offline":
            arrays = self._arrays(self.train_prompt_ids, [r[:K] for r in self.train_response_ids], k=K)
        else:
            assistants = [self.assistant_samples(i) for i in range(K - 2)]
            own = self.samples(policy, f"{mode}/round_{t}/samples", f"{mode} round {t} samples")
            lists = [[answer, *(a[n] for a in assistants), own[n]] for n, answer in enumerate(self.train_answer_ids)]
            arrays = self._arrays(self.train_prompt_ids, lists, k=K)
            arrays["policy_sample_correct_N"] = np.array(
                [own[n] == a for n, a in enumerate(self.train_answer_ids)], bool
            )
        # The reference: πθ(t) itself in self-play; the fixed πθ(0) for offline lists.
        reference = self.restore_policy("sft", self.config.model, 0) if mode == "offline" else policy
        arrays["ref_logps_NxK"] = evaluate.score_ranked(reference, arrays, self.config.eval.batch_size)
        if jax.process_index() == 0:
            save_ranked_set(path, arrays)
        return arrays

    # --------------------------------------------------------------------------- the loop

    def _sft_start(self) -> evaluate.SftBaseline:
        """πθ(0): trained (or restored), evaluated, and turned into the reference lists of
        every later evaluation. Its weights are not kept: rounds restore them when needed."""
        c = self.config
        sft = self.supervised_model("sft", c.model, c.sft.steps, c.sft.optim, c.sft.batch_size)
        sft_eval = self.evaluate("sft", 0, sft, baseline=None)
        correct = None if sft_eval["correct"] is None else np.array(sft_eval["correct"])
        return evaluate.sft_baseline(
            sft, self.heldout, sft_eval["responses"], correct, pad_id=self.pad_id, batch_size=c.eval.batch_size
        )

    def round_policy(self, mode: str, t: int, K: int) -> Decoder:
        """πθ(t+1) of an arm: restored if round t is done, else round t is run."""
        c = self.config
        if self.policies.saved(mode, t + 1):
            return self.restore_policy(mode, c.model, t + 1)
        # A fresh restore: training donates the buffers of the model it starts from.
        start = self.restore_policy(*(("sft", c.model, 0) if t == 0 else (mode, c.model, t)))
        if mode == "sft":  # control arm: more SFT epochs, same number of steps as a round
            arrays, objective = self.sft_arrays, train.sft_objective(c.logprob_chunk)
        else:
            arrays = self.ranked_set(mode, t, start, K)
            objective = train.pl_dpo_objective(c.loss, c.logprob_chunk)
        optim = ml_collections.ConfigDict(c.rounds.optim.to_dict())
        if c.rounds.get("lr_per_round"):
            optim.lr = float(c.rounds.lr_per_round[t])
        spec = PhaseSpec(
            name=f"{mode}/round_{t}",
            directory=os.path.join(self.workdir, mode, f"round_{t}"),
            num_epochs=c.rounds.epochs,
            batch_size=c.rounds.batch_size,
            seed=c.seed + 7919 * (t + 1),
            optim=optim,
            save_every_steps=c.checkpoint.save_every_steps,
            max_steps=c.rounds.get("max_steps") or None,
            length_buckets=self._length_buckets(),
        )
        policy = train_phase(
            start, arrays, objective, spec, mesh=self.mesh, rules=self.rules, metric_log=self.metric_log
        )
        self.policies.save(mode, t + 1, policy, {"mode": mode, "round": t + 1, "K": K})
        return policy

    def _export(self, mode: str, index: int, policy: Decoder) -> None:
        """πθ(index) as a Hugging Face folder `<mode>/hf_export/round_<index>` (lm-eval, vLLM)."""
        out = os.path.join(self.workdir, mode, "hf_export", f"round_{index}")
        if jax.process_index() == 0 and not os.path.exists(os.path.join(out, "config.json")):
            save_pretrained(policy, out)
            self.tokenizer.save_pretrained(out)

    def run(self) -> list[dict[str, Any]]:
        """Every arm of the config, round after round; returns the evaluation table."""
        c = self.config
        try:
            baseline = self._sft_start()
            for mode in config_lib.modes_of(c):
                K = config_lib.list_size(c, mode)
                for t in range(c.rounds.num):
                    policy = self.round_policy(mode, t, K)
                    self.evaluate(mode, t + 1, policy, baseline)
                    if c.get("export_hf"):
                        self._export(mode, t + 1, policy)
                    del policy  # one policy in memory at a time
        finally:
            self.metric_log.close()
        return self.table
