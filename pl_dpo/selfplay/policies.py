"""Every policy of a run on disk: πθ(0), the assistants and each round's πθ(t).

A lineage ("sft", "assistant_0", "spin", ...) is a folder with one Orbax checkpoint
per policy (`<workdir>/<lineage>/policies/<t>`, see checkpoint.PolicyCheckpoints).
Policies are created and restored directly onto the mesh: never whole on one device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from pl_dpo import config_lib, sharding
from pl_dpo.models import Decoder, create_model, from_pretrained
from pl_dpo.selfplay.run_data import run_tokenizer
from pl_dpo.tokenizer import load_tokenizer
from pl_dpo.training import checkpoint
from pl_dpo.workdir import layout as wd


class PolicyStore:
    def __init__(self, workdir: str, mesh: jax.sharding.Mesh, rules: sharding.Rules, vocab_size: int):
        self.workdir, self.mesh, self.rules, self.vocab_size = workdir, mesh, rules, vocab_size

    @contextlib.contextmanager
    def _checkpoints(self, lineage: str) -> Iterator[checkpoint.PolicyCheckpoints]:
        ckpts = checkpoint.PolicyCheckpoints(wd.policies_dir(self.workdir, lineage))
        try:
            yield ckpts
        finally:
            ckpts.close()

    def abstract(self, model_cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any]:
        """The model's graph and its state as ShapeDtypeStructs carrying their shardings."""
        decoder_cfg = config_lib.model_config(model_cfg, self.vocab_size)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(decoder_cfg, seed=0)))
        return graphdef, sharding.with_shardings(state, sharding.logical_to_shardings(state, self.mesh, self.rules))

    def initial(self, model_cfg: ml_collections.ConfigDict, seed: int) -> Decoder:
        """A model before any training here: a Hugging Face folder, or a random preset."""
        if model_cfg.hf_path:
            _, target = self.abstract(model_cfg)
            return from_pretrained(
                model_cfg.hf_path,
                param_dtype=model_cfg.param_dtype,
                compute_dtype=model_cfg.compute_dtype,
                remat=model_cfg.remat,
                shardings=jax.tree.map(lambda a: a.sharding, target),
            )
        decoder_cfg = config_lib.model_config(model_cfg, self.vocab_size)
        return sharding.create_sharded_module(lambda: create_model(decoder_cfg, seed=seed), self.mesh, self.rules)

    def saved(self, lineage: str, index: int) -> bool:
        with self._checkpoints(lineage) as ckpts:
            return index in ckpts.all_rounds()

    def save(self, lineage: str, index: int, model: Decoder, metadata: dict[str, Any]) -> None:
        with self._checkpoints(lineage) as ckpts:
            ckpts.save(index, nnx.state(model), metadata)

    def restore(self, lineage: str, model_cfg: ml_collections.ConfigDict, index: int) -> Decoder:
        graphdef, target = self.abstract(model_cfg)
        with self._checkpoints(lineage) as ckpts:
            return nnx.merge(graphdef, ckpts.restore(index, target))


class SavedPolicyError(ValueError):
    """A path given as a run's saved policy is not one; names the path and what there is instead."""


def is_saved_policy(path: str) -> bool:
    """`path` is a policy step folder of a run (`<workdir>/<lineage>/policies/<t>`), not a Hugging Face folder."""
    return os.path.basename(os.path.dirname(os.fspath(path).rstrip("/"))) == "policies"


def saved_policy(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None) -> tuple[Decoder, Any]:
    """The policy a run saved at `path` (`<workdir>/<lineage>/policies/<t>`: πθ(0) of `sft`, an assistant, a mode's
    πθ(t)) and its tokenizer, as the run built them from its own `config.json`; restored onto `mesh` (default:
    every device, fully sharded), in `dtype` (default: the run's param and compute dtypes)."""
    path = os.fspath(path).rstrip("/")
    policies = os.path.dirname(path)
    lineage_dir = os.path.dirname(policies)
    workdir, lineage, index = os.path.dirname(lineage_dir), os.path.basename(lineage_dir), os.path.basename(path)
    if os.path.basename(policies) != "policies" or not index.isdigit():
        raise SavedPolicyError(f"{path}: not a run's policy folder (<workdir>/<lineage>/policies/<t>)")
    config_path = epath.Path(workdir, "config.json")
    if not config_path.exists():
        raise SavedPolicyError(f"{path}: no config.json in {workdir}, the run's workdir")
    if not wd.policy_committed(workdir, lineage, int(index)):
        saved = (
            sorted(p.name for p in epath.Path(policies).glob("*") if p.name.isdigit())
            if os.path.isdir(policies)
            else []
        )
        saved = [t for t in saved if wd.policy_committed(workdir, lineage, int(t))]
        raise SavedPolicyError(f"{path}: no saved policy {index} of {lineage} (saved: {', '.join(saved) or 'none'})")
    saved_config = wd.read_config_json(config_path)
    assistants = saved_config["assistants"]
    # Not the record of the input files' fingerprints (agreement.INPUTS_KEY: file paths as keys, not config fields).
    fields = {k: v for k, v in saved_config.items() if not k.startswith("_")}
    config = ml_collections.ConfigDict({**fields, "assistants": []})
    model_cfg, tokenizer_path = config.model, ""
    if lineage.startswith("assistant_"):
        section = ml_collections.ConfigDict(assistants[int(lineage.removeprefix("assistant_"))])
        model_cfg, tokenizer_path = section.model, config_lib.foreign_tokenizer(section)
    if dtype:
        model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        model_cfg.update(param_dtype=dtype, compute_dtype=dtype)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else run_tokenizer(config, workdir)
    store = PolicyStore(workdir, mesh or sharding.make_mesh(), sharding.DEFAULT_DECODER_RULES, len(tokenizer))
    return store.restore(lineage, model_cfg, int(index)), tokenizer
