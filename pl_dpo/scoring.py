"""Log-probs of responses under a model: the training objective's and the reference's, one code path.

`response_logps` / `list_logps` are pure (called inside the jitted train step);
`score_ranked` runs them batch by batch over a whole ranked set on the host side
(a round's reference log-probs, the held-out evaluation).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pl_dpo import logprobs, sharding
from pl_dpo.data import BatchIterator
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


@jax.jit
def _score_batch(graphdef, params, tokens_BxKxL, loss_mask_BxKxL, attn_valid_BxKxL, positions_BxKxL):
    return list_logps(nnx.merge(graphdef, params), tokens_BxKxL, loss_mask_BxKxL, attn_valid_BxKxL, positions_BxKxL)


def score_ranked(
    model: Decoder, arrays: dict[str, np.ndarray], batch_size: int, length_buckets: tuple[int, ...] | None = None
) -> np.ndarray:
    """Summed response log-probs [N, K] of a ranked set under `model` (0 where invalid).

    These are the reference log-probs of a round when `model` is πθ(t). One length
    bucket (the arrays' L) by default: scoring is not a hot path, a compile is."""
    graphdef, params = nnx.split(model)
    n, k, _ = arrays["tokens_NxKxL"].shape
    out = np.zeros((n, k), np.float32)
    it = BatchIterator(
        {**arrays, "example_ids_N": np.arange(n, dtype=np.int64)},
        batch_size=batch_size,
        shuffle=False,
        drop_remainder=False,
        num_epochs=1,
        length_buckets=length_buckets or (arrays["tokens_NxKxL"].shape[-1],),
    )
    replicated = sharding.replicated_like(params)
    for batch in it:
        fields = (batch.tokens_BxKxL, batch.loss_mask_BxKxL, batch.attn_valid_BxKxL, batch.positions_BxKxL)
        logps = _score_batch(graphdef, params, *(sharding.put_replicated(x, replicated) for x in fields))
        real = batch.example_ids_B >= 0
        out[batch.example_ids_B[real]] = sharding.to_host(logps)[real]
    return np.where(arrays["valid_NxK"], out, 0.0).astype(np.float32)
