"""Each program lowered for a mesh of abstract devices, from abstract shapes only (no weights read, nothing
allocated): the weights as `nnx.eval_shape` gives them with the run's shardings, the batch as the data package
makes the run's batches, and the same jitted functions the run calls."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pl_dpo import decode_layout, sampler, scoring, sharding
from pl_dpo.data import BatchIterator, PackedBatch, RankedBatch, assemble_ranked
from pl_dpo.harness import requests as harness_requests
from pl_dpo.models import create_model, lora
from pl_dpo.plan.programs import Program
from pl_dpo.plan.slices import chip_of
from pl_dpo.training import train


def _abstract(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _placed(state, mesh):
    """(abstract `state` carrying the run's shardings, those shardings)."""
    shardings = sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES)
    return jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), state, shardings), shardings


def abstract_model(cfg, mesh):
    """(graphdef, abstract params with their shardings, param shardings)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(cfg, seed=0)))
    return graphdef, *_placed(params, mesh)


def abstract_lora_model(cfg, adapters: lora.LoraConfig, mesh):
    """The model as a LoRA phase trains it: (graphdef, adapters, their shardings, frozen rest, its shardings)."""

    def adapted():
        model = create_model(cfg, seed=0)
        lora.add_adapters(model, adapters, jax.random.key(0))
        if adapters.frozen_int8:
            lora.quantize_frozen(model)
        return model

    graphdef, params, frozen = nnx.split(nnx.eval_shape(adapted), nnx.LoRAParam, ...)
    return graphdef, *_placed(params, mesh), *_placed(frozen, mesh)


def largest_batch(p: Program, with_ref: bool) -> RankedBatch | PackedBatch:
    """The program's largest batch (host arrays), made by the data package as it makes the run's batches.

    One list at the largest shapes (a prompt of `prompt_len` tokens and K responses that fill the row of
    `length`, `assemble_ranked`) goes through a `BatchIterator` of the program's layout, which pads it to `batch`
    rows and cuts them: plain rows of L = `length`; packed rows of T = P + K R slots with M = K R scored tokens
    (the iterator's `packing.packed_buckets` and `packing.scored_slots`). The example ids (and labels) stay on the
    host: the batch is lowered without them."""
    k = p.k
    ranked = assemble_ranked(
        [[1] * p.prompt_len],
        [[[1] * (p.length - p.prompt_len)] * k],
        pad_id=0,
        k=k,
        seq_len=p.length,
        prompt_len=p.prompt_len,
        ref_logps=np.zeros((1, k), np.float32) if with_ref else None,
    )
    batches = BatchIterator(
        ranked,
        batch_size=p.batch,
        batch_type=PackedBatch if p.packed else RankedBatch,
        shuffle=False,
        drop_remainder=False,
        num_epochs=1,
    )
    return dataclasses.replace(next(batches), example_ids_B=None, labels_BxK=None)


def abstract_batch(p: Program, bsh, with_ref: bool) -> RankedBatch | PackedBatch:
    """`largest_batch` as abstract arrays with the batch sharding `bsh`."""
    return jax.tree.map(lambda x: _abstract(x.shape, x.dtype, bsh), largest_batch(p, with_ref))


def lower(p: Program, mesh, *, loss_cfg=None, chunk_size: int = 256):
    """The program lowered for `mesh` (abstract devices), ready for `.compile()`."""
    graphdef, params, param_sh = abstract_model(p.model, mesh)
    bsh = sharding.batch_sharding(mesh)
    frozen, frozen_sh = (), None
    if p.kind == "train" and p.lora is not None:  # as train.init_train_state splits a model with adapters
        graphdef, params, param_sh, frozen_state, frozen_sh = abstract_lora_model(p.model, p.lora, mesh)
        frozen = (frozen_state,)
    with jax.set_mesh(mesh):
        if p.kind == "train":
            tx = p.optim.build(1000)
            opt = jax.eval_shape(tx.init, params)
            opt_sh = sharding.logical_to_shardings(opt, mesh, sharding.DEFAULT_DECODER_RULES, rank_mismatch="replicate")
            opt = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), opt, opt_sh)
            objective = (
                train.sft_objective(chunk_size)
                if p.objective == "sft"
                else train.pl_dpo_objective(loss_cfg, chunk_size=chunk_size)
            )
            step = train.make_train_step(graphdef, objective, tx, train.TrainState(param_sh, opt_sh, frozen_sh), bsh)
            return step.lower(params, opt, abstract_batch(p, bsh, with_ref=p.objective != "sft"), *frozen)
        if p.kind == "score" and p.harness:  # as `harness.requests.continuation_scores`: rows split as in scoring
            rows = -(-p.batch // sharding.batch_shards(mesh)) * sharding.batch_shards(mesh)
            tokens = _abstract((rows, p.length), jnp.int32, bsh)
            valid = _abstract((rows, p.length), jnp.bool_, bsh)
            return harness_requests._token_scores.lower(graphdef, params, tokens, tokens, valid, chunk_size=chunk_size)
        if p.kind == "score":
            # As `scoring.score_ranked`: the batch split over ("data", "fsdp") (padded to a multiple of that),
            # the weights as trained (FSDP: XLA gathers each layer's weights as the forward reaches it).
            shards = sharding.batch_shards(mesh)
            batch = abstract_batch(dataclasses.replace(p, batch=-(-p.batch // shards) * shards), bsh, with_ref=False)
            score = jax.jit(lambda prm, batch: scoring.batch_logps(nnx.merge(graphdef, prm), batch, chunk_size))
            return score.lower(params, batch)
    return _lower_sample(p, mesh, graphdef, params)


def _lower_sample(p: Program, mesh, graphdef, params):
    """As `sampler.generate_responses`: the weights as trained are the program's arguments (they stay resident);
    the program moves them into the decode layout (`decode_layout.decode_weights`: tensor parallel over the
    fewest chips that hold them, per the chip's memory) and decodes a batch split over the rest. A model read
    straight from its folder (`Program.from_folder`): the decode-layout weights are the arguments."""
    sampling = p.sampling or sampler.SamplingConfig(max_new_tokens=p.new_tokens, eos_ids=(0,), pad_id=0)
    chip = chip_of(mesh.devices.flat[0].device_kind)
    mesh_shape = tuple(int(mesh.shape[a]) for a in sharding.MESH_AXES)
    max_len = p.prompt_len + p.new_tokens
    tp = p.decode_tp or decode_layout.decode_tp_split(
        p.model, mesh_shape, p.batch, max_len, chip.hbm_bytes if chip else None, sampling.int8
    )
    layout = decode_layout.decode_layout(mesh.devices, mesh_shape, tp)
    batch = -(-p.batch // layout.groups) * layout.groups
    g, layers_state, rest_state = nnx.split(nnx.merge(graphdef, params), nnx.PathContains("layers"), ...)
    static = decode_layout.relayout_settings(p.model, layers_state, rest_state, layout, sampling.int8)

    def sample(layers_state, rest_state, tokens, valid, keys):
        rest, layers = decode_layout._relayout(layers_state, rest_state, **static)
        return sampler._generate_padded(g, rest, layers, tokens, valid, keys, sampling, layout)

    def sample_read_in_place(rest, layers, tokens, valid, keys):  # a ModelFolder: weights already in the layout
        return sampler._generate_padded(g, rest, layers, tokens, valid, keys, sampling, layout)

    rows = layout.batch()
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    weights = (
        decode_layout.abstract_decode_weights(layers_state, rest_state, static)
        if p.from_folder
        else (layers_state, rest_state)
    )
    return jax.jit(sample_read_in_place if p.from_folder else sample).lower(
        *weights,
        _abstract((batch, p.prompt_len), jnp.int32, rows),
        _abstract((batch, p.prompt_len), jnp.bool_, rows),
        _abstract(keys.shape, keys.dtype, rows),
    )
