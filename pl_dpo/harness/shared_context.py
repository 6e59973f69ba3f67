"""Continuations that share a context (a multiple-choice question's answers) scored behind one copy of it.

lm-eval asks for log p(choice | context) once per choice: with a few-shot prompt of P tokens and four choices
of R tokens, the plain layout runs 4 * (P + R) tokens through the model. Packed as the K responses of a ranked
list are (`pl_dpo.data.packing`, the same segment ids, positions and attention mask), a row holds the context
once and every choice after it:

    tokens_BxT       [ c_0 ... c_{P-1} | a_1 ... | a_2 ... | ... | pad ]
    segment_ids_BxT  [ 0   ...   0     | 1  ...  | 2  ...  | ... | -1  ]
    positions_BxT    [ 0   ...  P-1    | P  ...  | P  ...  | ... | 0   ]

so P + 4 * R tokens, each choice seeing exactly what it sees in its own row. The scored tokens are listed
compactly (`source_BxM`: the slot whose hidden state predicts `targets_BxM`; the context's last slot for every
choice's first token), so logits are computed for them only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pl_dpo import logprobs, sharding
from pl_dpo.models import Decoder

# Scored-token counts per row are padded up to one of these: with the row-length buckets, few compiles.
SCORED_BUCKETS = (16, 64, 256, 1024, 4096)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _packed_scores(graphdef, params, tokens_BxT, segments_BxT, positions_BxT, source_BxM, targets_BxM, chunk_size):
    model = nnx.merge(graphdef, params)
    hidden_BxTxD = model(tokens_BxT, positions_BxT, segments_BxT >= 0, segment_ids_BxL=segments_BxT)
    hidden_BxMxD = jnp.take_along_axis(hidden_BxTxD, source_BxM[..., None], axis=1)
    return logprobs.token_logprobs_and_greedy(hidden_BxMxD, model.unembedding_DxV(), targets_BxM, chunk_size)


def pack_rows(groups: Sequence[tuple[Sequence[int], list[tuple[int, Sequence[int]]]]], max_slots: int):
    """Rows of (context, [(request index, continuation), ...]): each group's continuations behind one copy of its
    context, split over several rows where they would not fit in `max_slots` (a row always takes one)."""
    rows = []
    for context, members in groups:
        row: list[tuple[int, Sequence[int]]] = []
        used = len(context)
        for index, continuation in members:
            if row and used + len(continuation) > max_slots:
                rows.append((context, row))
                row, used = [], len(context)
            row.append((index, continuation))
            used += len(continuation)
        rows.append((context, row))
    return rows


def scores(
    model: Decoder,
    rows: Sequence[tuple[Sequence[int], list[tuple[int, Sequence[int]]]]],
    out: list[tuple[float, bool]],
    *,
    batch_size: int,
    bucket_length,
    chunk_size: int,
) -> None:
    """Fills out[index] = (log p(continuation | context), is greedy) for every (index, continuation) of `rows`
    (`pack_rows`). Rows go longest first in batches of `batch_size` rows, split over the weights' mesh."""
    graphdef, params = nnx.split(model)
    mesh, placement, shards = sharding.row_placement(params)
    batch_size = -(-batch_size // shards) * shards
    width = [len(c) + sum(len(x) for _, x in members) for c, members in rows]
    order = sorted(range(len(rows)), key=lambda i: -width[i])
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        slots = bucket_length(width[order[start]])
        scored = max(sum(len(x) for _, x in members) for _, members in batch)
        m = next((b for b in SCORED_BUCKETS if scored <= b), -(-scored // SCORED_BUCKETS[-1]) * SCORED_BUCKETS[-1])
        tokens = np.zeros((batch_size, slots), np.int32)
        segments = np.full((batch_size, slots), -1, np.int32)
        positions = np.zeros((batch_size, slots), np.int32)
        source = np.zeros((batch_size, m), np.int32)
        targets = np.zeros((batch_size, m), np.int32)
        spans = []  # (request index, batch row, first scored slot, count)
        for row, (context, members) in enumerate(batch):
            p = len(context)
            tokens[row, :p], segments[row, :p], positions[row, :p] = context, 0, np.arange(p)
            slot, k = p, 0
            for segment, (index, continuation) in enumerate(members, start=1):
                r = len(continuation)
                tokens[row, slot : slot + r], segments[row, slot : slot + r] = continuation, segment
                positions[row, slot : slot + r] = p + np.arange(r)
                # Token i is predicted at the slot before it; token 0 at the context's last slot.
                source[row, k : k + r] = np.concatenate([[p - 1], slot + np.arange(r - 1)])
                targets[row, k : k + r] = continuation
                spans.append((index, row, k, r))
                slot, k = slot + r, k + r
        segments[len(batch) :, 0] = 0  # filler rows: one token each, their scores dropped
        score = functools.partial(_packed_scores, graphdef, params, chunk_size=chunk_size)
        logps, greedy = sharding.call_on_rows(score, mesh, placement, tokens, segments, positions, source, targets)
        logps, greedy = sharding.to_host(logps), sharding.to_host(greedy)
        for index, row, k, r in spans:
            out[index] = (float(logps[row, k : k + r].sum(dtype=np.float64)), bool(greedy[row, k : k + r].all()))
