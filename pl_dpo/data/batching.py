"""Batches in the training layout, a resumable iterator, and prompt batches for generation.

In: a `RankedSet` (`pl_dpo.data.ranked_set`), built in memory or loaded with `load_ranked_set`. The batch
type decides the layout: `RankedBatch` (K rows of [prompt, response_k] per list) or `PackedBatch`
(`pl_dpo.data.packing`: one row per list, the K responses behind one copy of the prompt).

Shapes are fixed per bucket: L of a batch is the smallest bucket >= the longest
sequence of the GLOBAL batch, so every process of a multi-host run cuts the same
L and their slices assemble into one global array. Process p of n gets rows
[p*B/n, (p+1)*B/n) of each global batch: slices are disjoint and cover it.

Padding rows (only with drop_remainder=False, to keep the batch size fixed)
repeat real rows of the same batch, so every row has real attention, but carry
valid_BxK=False, loss_mask False and example_ids_B=-1: they add to no sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from pl_dpo.data import packing
from pl_dpo.data.ranked_set import RankedSet


# A pytree (every field a leaf, `ref_logps_BxK=None` an empty subtree): sharded and passed to jit as one argument.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RankedBatch:
    """One (per-process) batch; right-padded, responses best first along K.

    loss_mask_BxKxL[b, k, i] is True iff tokens_BxKxL[b, k, i] is a response token
    (EOS included): its log-prob is read from the logits at position i-1, so the
    mask at i=0 is always False. positions_BxKxL is arange(L) (right padding).
    SFT is K=1.
    """

    tokens_BxKxL: np.ndarray  # int32
    loss_mask_BxKxL: np.ndarray  # bool
    attn_valid_BxKxL: np.ndarray  # bool, non-padding tokens
    positions_BxKxL: np.ndarray  # int32
    valid_BxK: np.ndarray  # bool, response exists
    example_ids_B: np.ndarray  # int64, -1 for padding rows
    ref_logps_BxK: np.ndarray | None = None  # float32
    labels_BxK: np.ndarray | None = None  # float32 graded labels (ratings, verifier scores), higher is better


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts alone, LEFT-padded so that generation continues at the last column."""

    prompt_tokens_BxP: np.ndarray  # int32
    prompt_valid_BxP: np.ndarray  # bool
    positions_BxP: np.ndarray  # int32, 0 at the first real token (0 on padding too)
    example_ids_B: np.ndarray  # int64, -1 for padding rows


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def pick_bucket(need: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if b >= need:
            return b
    raise ValueError(f"no length bucket >= {need} in {sorted(buckets)}")


def gather_batch(ranked: RankedSet, idx: np.ndarray, seq_len: int, pad: np.ndarray) -> RankedBatch:
    """Lists `idx` cut to `seq_len`; rows where `pad` is True become padding rows."""
    tokens = ranked.tokens_NxKxL[idx, :, :seq_len].astype(np.int32)
    keep = ~pad
    loss_mask = ranked.loss_mask_NxKxL[idx, :, :seq_len] & keep[:, None, None]
    valid = ranked.valid_NxK[idx] & keep[:, None]
    ids = ranked.example_ids_N[idx] if ranked.example_ids_N is not None else idx.astype(np.int64)
    ref, labels = ranked.ref_logps_NxK, ranked.labels_NxK
    b, k = valid.shape
    return RankedBatch(
        tokens_BxKxL=tokens,
        loss_mask_BxKxL=loss_mask,
        attn_valid_BxKxL=ranked.attn_valid_NxKxL[idx, :, :seq_len].copy(),
        positions_BxKxL=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, k, seq_len)).copy(),
        valid_BxK=valid,
        example_ids_B=np.where(pad, -1, ids).astype(np.int64),
        ref_logps_BxK=None if ref is None else np.where(valid, ref[idx], 0.0).astype(np.float32),
        labels_BxK=None if labels is None else np.where(valid, labels[idx], 0.0).astype(np.float32),
    )


class BatchIterator:
    """Epochs of shuffled global batches of a ranked set; yields this process's slice as a `batch_type`:
    RankedBatch, or PackedBatch (the K responses behind one prompt, `pl_dpo.data.packing`).

    The order is a function of (seed, epoch) only, so `state()` (epoch, step) is
    all that is needed to resume exactly: `restore(state)` then continues with the
    batch that would have come next. num_epochs=None repeats forever.
    """

    def __init__(
        self,
        ranked: RankedSet,
        *,
        batch_size: int,
        batch_type: type[RankedBatch] | type[packing.PackedBatch],
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        length_buckets: Sequence[int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not isinstance(ranked, RankedSet):
            raise TypeError(f"BatchIterator takes a RankedSet, got {type(ranked).__name__}")
        if batch_type not in (RankedBatch, packing.PackedBatch):
            raise ValueError(f"batch_type={batch_type!r}: RankedBatch or PackedBatch")
        self._n = ranked.num_lists
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if drop_remainder and self._n < batch_size:
            raise ValueError(f"{self._n} examples < batch_size={batch_size} with drop_remainder=True: no batch")
        self._ranked = ranked
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_remainder, self.num_epochs = drop_remainder, num_epochs
        max_len = ranked.tokens_NxKxL.shape[-1]
        self.buckets = tuple(length_buckets) if length_buckets else default_buckets(max_len)
        if max(self.buckets) > max_len:
            self.buckets = tuple(sorted({min(b, max_len) for b in self.buckets}))
        self._lens_N = ranked.attn_valid_NxKxL.sum(-1).max(-1)  # Longest response row per example.
        pick_bucket(int(self._lens_N.max()), self.buckets)  # Fail now, not mid-epoch.
        self.batch_type = batch_type
        if batch_type is packing.PackedBatch:  # The buckets scaled to packed rows: as many compiles as plain rows.
            prompt_N, self._scored_N = packing.packed_lengths(ranked)
            self._packed_N = prompt_N + self._scored_N
            self._min_prompt, self._max_scored = int(prompt_N.min()), int(self._scored_N.max())
            self.packed_buckets = packing.packed_buckets(self.buckets, max_len, int(self._packed_N.max()))
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self._n, self.batch_size)
        return full if self.drop_remainder or rest == 0 else full + 1

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self.seed, epoch]).permutation(self._n)

    def global_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices of the global batch, padding flags), identical on every process."""
        order = self._order(epoch)
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        pad = np.zeros(self.batch_size, bool)
        if len(idx) < self.batch_size:  # Only when not drop_remainder.
            pad[len(idx) :] = True
            idx = np.resize(idx, self.batch_size)  # Repeat real rows; flagged as padding.
        return idx, pad

    def state(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_examples": self._n,
            "batch_size": self.batch_size,
        }

    def restore(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("num_examples", self._n), ("batch_size", self.batch_size)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"iterator state has {key}={state[key]}, this iterator has {mine}: not the same data order"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def __iter__(self) -> Iterator[RankedBatch]:
        return self

    def __next__(self) -> RankedBatch | packing.PackedBatch:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx, pad = self.global_indices(self.epoch, self.step)
        per = self.batch_size // self.process_count
        lo = self.process_index * per
        if self.batch_type is packing.PackedBatch:
            seq_len = pick_bucket(int(self._packed_N[idx].max()), self.packed_buckets)
            num_scored = packing.scored_slots(seq_len, self._min_prompt, self._max_scored)
            batch = packing.gather_packed(self._ranked, idx[lo : lo + per], pad[lo : lo + per], seq_len, num_scored)
        else:
            seq_len = pick_bucket(int(self._lens_N[idx].max()), self.buckets)
            batch = gather_batch(self._ranked, idx[lo : lo + per], seq_len, pad[lo : lo + per])
        self.step += 1
        return batch


def prompt_batches(
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    length_buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[PromptBatch]:
    """All prompts in order, left-padded, P cut to a bucket; last batch padded (ids -1)."""
    for key in ("prompt_tokens_NxP", "prompt_valid_NxP"):
        if key not in arrays:
            raise ValueError(f"prompt_batches needs {key}; have {sorted(arrays)}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by process_count={process_count}")
    ptoks, pvalid = arrays["prompt_tokens_NxP"], arrays["prompt_valid_NxP"]
    n, p_max = ptoks.shape
    ids_n = arrays.get("example_ids_N", np.arange(n, dtype=np.int64))
    buckets = tuple(length_buckets) if length_buckets else default_buckets(p_max, smallest=8)
    plen_n = pvalid.sum(-1)
    per = batch_size // process_count
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        pad = np.zeros(batch_size, bool)
        pad[len(idx) :] = True
        idx = np.resize(idx, batch_size)
        p = pick_bucket(int(plen_n[idx].max()), [min(b, p_max) for b in buckets])
        sl = slice(process_index * per, (process_index + 1) * per)
        mine, mine_pad = idx[sl], pad[sl]
        valid = pvalid[mine, p_max - p :]
        yield PromptBatch(
            prompt_tokens_BxP=ptoks[mine, p_max - p :].astype(np.int32),
            prompt_valid_BxP=valid.copy(),
            positions_BxP=np.maximum(np.cumsum(valid, -1) - 1, 0).astype(np.int32),
            example_ids_B=np.where(mine_pad, -1, ids_n[mine]).astype(np.int64),
        )
