"""Every policy of a run on disk: πθ(0), the assistants and each round's πθ(t).

A lineage ("sft", "assistant_0", "spin", ...) is a folder with one Orbax checkpoint
per policy (`<workdir>/<lineage>/policies/<t>`, see checkpoint.PolicyCheckpoints).
Policies are created and restored directly onto the mesh: never whole on one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from flax import nnx

from pl_dpo import config_lib, sharding
from pl_dpo.models import Decoder, create_model, from_pretrained
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
