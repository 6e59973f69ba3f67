"""Shared-prompt packing: the K responses of a list in one row behind one copy of their prompt.

The plain layout (`pl_dpo.data.tokenize`) holds a list as K rows of [prompt, response_k], so
the prompt goes through the model K times. A packed row holds it once:

    tokens_BxT       [ p_0 ... p_{P-1} | r_1 ... | r_2 ... | ... | r_K ... | pad ... ]
    segment_ids_BxT  [ 0   ...   0     | 1  ...  | 2  ...  | ... | K  ...  | -1  ... ]
    positions_BxT    [ 0   ...  P-1    | P  ...  | P  ...  | ... | P  ...  | 0   ... ]

Attention is causal by slot within a segment; response tokens also see the prompt (segment 0)
and never another response, and positions restart at P after the prompt, so every response
sees exactly what it sees in its own unpacked row (`pl_dpo.models.decoder` builds that mask
from the segment ids).

Only response tokens are scored, so only they get logits: the `M` scored tokens of a row are
listed compactly, each with the slot whose hidden state predicts it (`source_BxM`: the slot
before it, or the prompt's last slot for a response's first token -- shared by all K
responses), its token id (`targets_BxM`) and which response it belongs to (`response_BxM`,
-1 on padding). Tokens through the model drop from K*(P+R) to P+K*R per list, and logits
from K*(P+R) to K*R.

Rows are built on the host from the global batch of the plain layout, so T is cut to a bucket
of the GLOBAL batch (every process of a multi-host run compiles the same shapes); the buckets
are the plain layout's, scaled to packed rows, and M follows from T.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from pl_dpo.data.ranked_set import RankedSet


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One (per-process) batch of packed lists; responses best first along K (see module doc)."""

    tokens_BxT: np.ndarray  # int32
    segment_ids_BxT: np.ndarray  # int32: 0 prompt, k+1 response k, -1 padding
    positions_BxT: np.ndarray  # int32
    source_BxM: np.ndarray  # int32: slot whose hidden state predicts the scored token
    targets_BxM: np.ndarray  # int32: the scored token
    response_BxM: np.ndarray  # int32: its response k in [0, K), -1 for padding
    valid_BxK: np.ndarray  # bool, response exists
    example_ids_B: np.ndarray  # int64, -1 for padding rows
    ref_logps_BxK: np.ndarray | None = None  # float32
    labels_BxK: np.ndarray | None = None  # float32

    @property
    def num_responses(self) -> int:
        return self.valid_BxK.shape[1]


def packed_lengths(ranked: RankedSet) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, scored tokens) per list, each [N] int64; a packed row holds their sum."""
    prompt_N = _prompt_mask(ranked, slice(None)).sum(-1)
    scored_N = (ranked.loss_mask_NxKxL & ranked.valid_NxK[..., None]).sum((1, 2))
    return prompt_N, scored_N


def packed_buckets(plain_buckets: Sequence[int], plain_max: int, packed_max: int) -> tuple[int, ...]:
    """The plain layout's length buckets scaled to packed rows (rounded up to multiples of 8, the last
    one `packed_max`): as many shapes, so as many compiles, as the plain layout."""
    scale = packed_max / plain_max
    return tuple(sorted({min(-(-int(np.ceil(b * scale)) // 8) * 8, packed_max) for b in plain_buckets} | {packed_max}))


def scored_slots(seq_len: int, arrays_min_prompt: int, max_scored: int) -> int:
    """M for packed rows of T = `seq_len` slots: at most T minus the shortest prompt, never more than
    the most scored tokens of any list (one M per T: no second compile axis)."""
    return max(min(seq_len - arrays_min_prompt, max_scored), 1)


def _prompt_mask(ranked: RankedSet, rows) -> np.ndarray:
    """True on the prompt tokens [len(rows), L] of the lists `rows`: the real, unscored tokens of their first
    response row (every row of a list starts with the same prompt)."""
    return ranked.attn_valid_NxKxL[rows, 0] & ~ranked.loss_mask_NxKxL[rows, 0]


def gather_packed(ranked: RankedSet, idx: np.ndarray, pad: np.ndarray, seq_len: int, num_scored: int) -> PackedBatch:
    """Rows `idx` of the plain layout packed into [B, seq_len] tokens and [B, num_scored] scored tokens.

    Rows where `pad` is True become padding rows: their tokens stay (real attention) but nothing
    is scored and no response is valid, as in `gather_batch`."""
    tokens_NxKxL, loss_mask_NxKxL = ranked.tokens_NxKxL, ranked.loss_mask_NxKxL
    prompt_BxL = _prompt_mask(ranked, idx)  # this batch's lists only: gather_packed runs every step
    b = len(idx)
    tokens = np.zeros((b, seq_len), np.int32)
    segments = np.full((b, seq_len), -1, np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    source = np.zeros((b, num_scored), np.int32)
    targets = np.zeros((b, num_scored), np.int32)
    response = np.full((b, num_scored), -1, np.int32)
    valid = ranked.valid_NxK[idx] & ~pad[:, None]
    for row, n in enumerate(idx):
        prompt = tokens_NxKxL[n, 0][prompt_BxL[row]]
        p = len(prompt)
        tokens[row, :p], segments[row, :p], positions[row, :p] = prompt, 0, np.arange(p)
        slot, scored = p, 0
        for j in np.flatnonzero(ranked.valid_NxK[n]):
            resp = tokens_NxKxL[n, j][loss_mask_NxKxL[n, j]]
            r = len(resp)
            if r == 0:
                continue
            if slot + r > seq_len or scored + r > num_scored:
                raise ValueError(f"packed row of example {n} needs more than T={seq_len} / M={num_scored} slots")
            tokens[row, slot : slot + r], segments[row, slot : slot + r] = resp, j + 1
            positions[row, slot : slot + r] = p + np.arange(r)
            if not pad[row]:
                # Token i of the response is predicted at the slot before it; token 0 at the prompt's last slot.
                source[row, scored : scored + r] = np.concatenate([[p - 1], slot + np.arange(r - 1)])
                targets[row, scored : scored + r] = resp
                response[row, scored : scored + r] = j
            slot, scored = slot + r, scored + r
    ids = ranked.example_ids_N[idx] if ranked.example_ids_N is not None else idx.astype(np.int64)
    ref, labels = ranked.ref_logps_NxK, ranked.labels_NxK
    return PackedBatch(
        tokens_BxT=tokens,
        segment_ids_BxT=segments,
        positions_BxT=positions,
        source_BxM=source,
        targets_BxM=targets,
        response_BxM=response,
        valid_BxK=valid,
        example_ids_B=np.where(pad, -1, ids).astype(np.int64),
        ref_logps_BxK=None if ref is None else np.where(valid, ref[idx], 0.0).astype(np.float32),
        labels_BxK=None if labels is None else np.where(valid, labels[idx], 0.0).astype(np.float32),
    )
