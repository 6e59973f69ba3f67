"""lm-evaluation-harness's requests on pl_dpo's own model, as token lists (no lm_eval here; `harness.lm` wraps it).

`continuation_scores`: the log-prob of each continuation after its context and whether greedy decoding would
give it (`loglikelihood`, the choices of a multiple-choice question behind one copy of their context:
`shared_context`; `loglikelihood_rolling` is a list of such windows). `generate`: the sampler's decode
(`generate_until`). Both split the rows over the weights' mesh as scoring and the sampler do, every process
passing the same requests and getting every answer. Compiles stay bounded: rows are sorted by length, padded to
a few length buckets, and every batch has the same number of rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from pl_dpo import decode_layout, logprobs, sampler, sharding
from pl_dpo.harness import shared_context
from pl_dpo.models import Decoder
from pl_dpo.models.decoder import positions_from_valid

# New tokens of a `generate_until` request whose task names no max_gen_toks (lm-eval's hf backend's default too).
MAX_GEN_TOKS = 256
# Row lengths are padded up to one of these (then to a multiple of the largest): one compile per bucket used.
# Steps of 1.5x and 2x in turn: a row wastes at most a third of its slots on padding (a 5-shot question of ~90
# tokens takes 96, not 128), at two compiles per doubling of the length.
LENGTH_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def bucket_length(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _token_scores(graphdef, params, inputs_BxL, targets_BxL, valid_BxL, chunk_size: int):
    model = nnx.merge(graphdef, params)
    hidden_BxLxD = model(inputs_BxL, positions_from_valid(valid_BxL), valid_BxL)
    return logprobs.token_logprobs_and_greedy(hidden_BxLxD, model.unembedding_DxV(), targets_BxL, chunk_size)


def continuation_scores(
    model: Decoder,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    max_length: int,
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE,
    share_contexts: bool = True,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is greedy) per (context tokens, continuation tokens) request.

    As lm-eval's `hf` backend reads a request: the model sees (context + continuation)[-(max_length + 1):][:-1]
    (left-truncated), and the continuation's tokens are the last ones predicted. Continuations that share their
    context (multiple choice) go behind one copy of it (`shared_context`, with `share_contexts`); the others,
    one row each."""
    seqs, splits = [], []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("continuation_scores: a request has an empty continuation")
        seq = (list(context) + list(continuation))[-(max_length + 1) :]
        seqs.append(np.asarray(seq, np.int32))
        splits.append(len(seq) - min(len(continuation), len(seq) - 1))  # where the scored tokens start
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, split) in enumerate(zip(seqs, splits, strict=True)):
        groups.setdefault(tuple(seq[:split].tolist()) if share_contexts else (i,), []).append(i)
    alone = [members[0] for members in groups.values() if len(members) == 1]
    shared = [(list(key), [(i, seqs[i][splits[i] :]) for i in m]) for key, m in groups.items() if len(m) > 1]
    if shared:
        shared_context.scores(
            model,
            shared_context.pack_rows(shared, max_length),
            out,
            batch_size=batch_size,
            bucket_length=bucket_length,
            chunk_size=chunk_size,
        )
    cont_lens = [len(seqs[i]) - splits[i] for i in alone]
    _one_row_each(model, [seqs[i] for i in alone], cont_lens, alone, out, batch_size=batch_size, chunk_size=chunk_size)
    return out


def _one_row_each(model, seqs, cont_lens, indices, out, *, batch_size: int, chunk_size: int) -> None:
    """out[indices[j]] for sequence j scored in a row of its own (its last cont_lens[j] tokens)."""
    if not seqs:
        return
    graphdef, params = nnx.split(model)
    mesh, rows, shards = sharding.row_placement(params)
    batch_size = -(-batch_size // shards) * shards
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: each batch's first row sets L
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        length = bucket_length(len(seqs[batch[0]]) - 1)
        inputs = np.zeros((batch_size, length), np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        valid = np.zeros((batch_size, length), bool)
        scored = np.zeros((batch_size, length), bool)
        for row, i in enumerate(batch):
            n = len(seqs[i]) - 1
            inputs[row, :n], targets[row, :n], valid[row, :n] = seqs[i][:-1], seqs[i][1:], True
            scored[row, n - cont_lens[i] : n] = True
        valid[len(batch) :, 0] = True  # filler rows: one token each, their scores dropped
        score = functools.partial(_token_scores, graphdef, params, chunk_size=chunk_size)
        logps, greedy = sharding.call_on_rows(score, mesh, rows, inputs, targets, valid)
        logps, greedy = sharding.to_host(logps), sharding.to_host(greedy)
        for row, i in enumerate(batch):
            mask = scored[row]
            out[indices[i]] = (float(logps[row][mask].sum(dtype=np.float64)), bool(greedy[row][mask].all()))


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    sampling: sampler.SamplingConfig,
    *,
    batch_size: int,
    seed: int = 0,
    weights=None,
) -> list[list[int]]:
    """New tokens per prompt (up to and including a stop token), greedy or sampled as `sampling` says. Prompts go
    longest first in batches of `batch_size`; a prompt's key comes from its index, so its sample does not depend on
    the batching. `weights`: `decode_layout.decode_weights` to reuse across calls."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts:
        return out
    if weights is None:  # moved into the decode layout once for every batch of this call
        bb, pb = sampler.bucket_shapes(batch_size, len(prompts[order[0]]), sampling)
        weights = decode_layout.decode_weights(model, bb, pb + sampling.max_new_tokens)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        plen = max(len(prompts[i]) for i in batch)
        tokens = np.full((len(batch), plen), sampling.pad_id, np.int32)
        valid = np.zeros((len(batch), plen), bool)
        for row, i in enumerate(batch):  # left-padded
            tokens[row, plen - len(prompts[i]) :], valid[row, plen - len(prompts[i]) :] = prompts[i], True
        keys = sampler.prompt_keys(seed, np.asarray(batch, np.int64))
        result = sampler.generate(model, tokens, valid, keys, sampling, weights=weights)
        # Every process gets the whole result (each holds the rows of its own chips).
        new, lengths = sharding.to_host(result.tokens_BxT), sharding.to_host(result.lengths_B)
        for row, i in enumerate(batch):
            out[i] = new[row, : lengths[row]].tolist()
    return out
