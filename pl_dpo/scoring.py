"""Log-probs of responses under a model: the training objective's and the reference's, one code path.

`response_logps` / `list_logps` / `packed_list_logps` are pure (called inside the jitted
train step); `batch_logps` picks the one that fits a batch's layout (plain `RankedBatch`
or shared-prompt `PackedBatch`). `score_ranked` runs it batch by batch over a whole ranked
set on the host side (a round's reference log-probs, the held-out evaluation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pl_dpo import logprobs, sharding
from pl_dpo.data import BatchIterator, PackedBatch, RankedBatch, RankedSet
from pl_dpo.models import Decoder


def response_logps(
    model: Decoder,
    tokens_NxL,
    loss_mask_NxL,
    attn_valid_NxL,
    positions_NxL,
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Summed log-prob of the tokens under `loss_mask` (the responses), float32 [N]."""
    hidden_NxLxD = model(tokens_NxL, positions_NxL, attn_valid_NxL)
    targets_NxL, mask_NxL = logprobs.shift_for_next_token(tokens_NxL, loss_mask_NxL)
    return logprobs.sequence_logprobs(
        hidden_NxLxD, model.unembedding_DxV(), targets_NxL, mask_NxL, chunk_size=chunk_size
    )


def list_logps(
    model: Decoder,
    tokens_BxKxL,
    loss_mask_BxKxL,
    attn_valid_BxKxL,
    positions_BxKxL,
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Summed response log-probs [B, K] of ranked lists: one forward pass over [B*K, L]."""
    B, K, L = tokens_BxKxL.shape
    flat = lambda x: x.reshape(B * K, L)
    fields = (tokens_BxKxL, loss_mask_BxKxL, attn_valid_BxKxL, positions_BxKxL)
    return response_logps(model, *map(flat, fields), chunk_size=chunk_size).reshape(B, K)


def packed_list_logps(model: Decoder, batch: PackedBatch, chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Summed response log-probs [B, K] of packed lists: one forward pass over [B, P + K*R], logits for the
    K*R response tokens only (each read from the hidden state of the slot that predicts it)."""
    segments_BxT = batch.segment_ids_BxT
    hidden_BxTxD = model(batch.tokens_BxT, batch.positions_BxT, segments_BxT >= 0, segment_ids_BxL=segments_BxT)
    hidden_BxMxD = jnp.take_along_axis(hidden_BxTxD, batch.source_BxM[..., None], axis=1)
    return logprobs.segment_logprobs(
        hidden_BxMxD,
        model.unembedding_DxV(),
        batch.targets_BxM,
        batch.response_BxM,
        batch.num_responses,
        chunk_size=chunk_size,
    )


def batch_logps(
    model: Decoder, batch: RankedBatch | PackedBatch, chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE
) -> jax.Array:
    """Summed response log-probs [B, K] of a batch in either layout."""
    if isinstance(batch, PackedBatch):
        return packed_list_logps(model, batch, chunk_size)
    fields = (batch.tokens_BxKxL, batch.loss_mask_BxKxL, batch.attn_valid_BxKxL, batch.positions_BxKxL)
    return list_logps(model, *fields, chunk_size=chunk_size)


def response_token_counts(batch: RankedBatch | PackedBatch) -> jax.Array:
    """Scored tokens [B, K] of each response (0 for a missing one or a padding row)."""
    if isinstance(batch, PackedBatch):
        k = jnp.arange(batch.num_responses)
        return jnp.sum(batch.response_BxM[..., None] == k, axis=1)
    return jnp.sum(batch.loss_mask_BxKxL, axis=-1)


@jax.jit
def _score_batch(graphdef, params, batch):
    return batch_logps(nnx.merge(graphdef, params), batch)


def score_ranked(
    model: Decoder,
    ranked: RankedSet,
    batch_size: int,
    length_buckets: tuple[int, ...] | None = None,
    *,
    batch_type: type[RankedBatch] | type[PackedBatch],
) -> np.ndarray:
    """Summed response log-probs [N, K] of a ranked set under `model` (0 where invalid).

    These are the reference log-probs of a round when `model` is πθ(t). One length
    bucket (the set's L) by default: scoring is not a hot path, a compile is.
    `batch_type=PackedBatch`: the K responses of a list scored behind one copy of its prompt."""
    graphdef, params = nnx.split(model)
    n, k, seq_len = ranked.tokens_NxKxL.shape
    # The batch is split over the weights' mesh's ("data", "fsdp") axes, as in training: each chip scores its own
    # rows and XLA gathers each layer's weights (FSDP) as the forward reaches it. Every process passes the same
    # rows; the log-probs stay on the devices until the end and are gathered once.
    mesh, rows, shards = sharding.row_placement(params)
    it = BatchIterator(
        ranked.replace(example_ids_N=np.arange(n, dtype=np.int64)),  # rows come back by their index
        batch_size=-(-batch_size // shards) * shards,
        batch_type=batch_type,
        shuffle=False,
        drop_remainder=False,
        num_epochs=1,
        length_buckets=length_buckets or (seq_len,),
    )
    ids, scored = [], []
    for batch in it:
        ids.append(batch.example_ids_B)
        batch = dataclasses.replace(batch, example_ids_B=None, ref_logps_BxK=None, labels_BxK=None)
        scored.append(sharding.call_on_rows(functools.partial(_score_batch, graphdef, params), mesh, rows, batch))
    out = np.zeros((n, k), np.float32)
    if scored:
        example_ids = np.concatenate(ids)
        real = example_ids >= 0
        out[example_ids[real]] = sharding.to_host(jnp.concatenate(scored) if len(scored) > 1 else scored[0])[real]
    return np.where(ranked.valid_NxK, out, 0.0).astype(np.float32)
