"""A ranked set: N prompts with K responses each, best first, as one frozen dataclass, and its `.npz` file.

The arrays' layout is `pl_dpo.data.tokenize`'s; their names carry their shapes. A ranked set knows nothing of
how it is batched: `BatchIterator(ranked, batch_type=RankedBatch | PackedBatch)` cuts it into plain rows or
shared-prompt rows. Its file is written atomically (`pl_dpo.data.npz`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from pl_dpo.data.npz import load_arrays, save_arrays


@dataclasses.dataclass(frozen=True)
class RankedSet:
    """Host arrays of N lists of K responses (right-padded to L tokens), checked when made.

    A missing response (a list shorter than K) has valid_NxK False and holds the prompt alone."""

    tokens_NxKxL: np.ndarray  # int: prompt ids then response ids (+EOS), right-padded
    loss_mask_NxKxL: np.ndarray  # bool: response tokens (never position 0: a first token has no prediction)
    attn_valid_NxKxL: np.ndarray  # bool: non-padding tokens
    valid_NxK: np.ndarray  # bool: response k exists
    prompt_tokens_NxP: np.ndarray | None = None  # int: the prompt alone, LEFT-padded (for the sampler)
    prompt_valid_NxP: np.ndarray | None = None  # bool
    example_ids_N: np.ndarray | None = None  # int: each list's prompt in its split (None: 0..N-1)
    ref_logps_NxK: np.ndarray | None = None  # float: summed log-probs under the round's reference
    labels_NxK: np.ndarray | None = None  # float: graded labels (ratings, verifier scores), higher is better
    policy_sample_correct_N: np.ndarray | None = None  # bool: a diagnostic, πθ(t)'s sample equals the answer

    def __post_init__(self):
        n, k, l = self.tokens_NxKxL.shape
        expect = {
            "tokens_NxKxL": ((n, k, l), "i"),
            "loss_mask_NxKxL": ((n, k, l), "b"),
            "attn_valid_NxKxL": ((n, k, l), "b"),
            "valid_NxK": ((n, k), "b"),
            "example_ids_N": ((n,), "i"),
            "ref_logps_NxK": ((n, k), "f"),
            "labels_NxK": ((n, k), "f"),
            "policy_sample_correct_N": ((n,), "b"),
            "prompt_valid_NxP": (None, "b"),
            "prompt_tokens_NxP": (None, "i"),
        }
        for key, (shape, kind) in expect.items():
            a = getattr(self, key)
            if a is None:
                continue
            if shape is not None and a.shape != shape:
                raise ValueError(f"ranked arrays: {key} has shape {a.shape}, expected {shape}")
            if a.dtype.kind not in (kind, "u" if kind == "i" else kind):
                raise ValueError(f"ranked arrays: {key} has dtype {a.dtype}, expected kind {kind!r}")
        if n == 0:
            raise ValueError("ranked arrays hold no examples")
        if self.loss_mask_NxKxL[..., 0].any():
            raise ValueError("loss_mask_NxKxL is True at position 0: a first token has no prediction")
        if (self.loss_mask_NxKxL & ~self.attn_valid_NxKxL).any():
            raise ValueError("loss_mask_NxKxL is True on padding (attn_valid_NxKxL False)")
        if self.ref_logps_NxK is not None and not np.isfinite(self.ref_logps_NxK[self.valid_NxK]).all():
            raise ValueError("ref_logps_NxK has non-finite values on valid responses")

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> RankedSet:
        """A ranked set from named arrays (a loaded `.npz`); a missing required array or an unknown name is refused."""
        fields = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in arrays]
        if missing:
            raise ValueError(f"ranked arrays lack {missing}; have {sorted(arrays)}")
        unknown = sorted(set(arrays) - set(fields))
        if unknown:
            raise ValueError(f"ranked arrays: unknown arrays {unknown}; a ranked set has {fields}")
        return cls(**{name: np.asarray(a) for name, a in arrays.items()})

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays it holds, by name (what its `.npz` file stores)."""
        return {f.name: a for f in dataclasses.fields(self) if (a := getattr(self, f.name)) is not None}

    @property
    def num_lists(self) -> int:
        return self.tokens_NxKxL.shape[0]

    @property
    def ids_N(self) -> np.ndarray:
        """Each list's example id (0..N-1 when the set names none)."""
        return np.arange(self.num_lists, dtype=np.int64) if self.example_ids_N is None else self.example_ids_N

    def replace(self, **fields: np.ndarray | None) -> RankedSet:
        return dataclasses.replace(self, **fields)

    def take(self, idx: np.ndarray) -> RankedSet:
        """The lists `idx`, in that order."""
        return RankedSet(**{name: a[idx] for name, a in self.arrays().items()})

    def prompts(self) -> dict[str, np.ndarray]:
        """The prompts alone, as the sampler reads them (prompt_tokens_NxP, prompt_valid_NxP, example_ids_N)."""
        if self.prompt_tokens_NxP is None or self.prompt_valid_NxP is None:
            raise ValueError("this ranked set holds no prompt_tokens_NxP / prompt_valid_NxP")
        return {
            "prompt_tokens_NxP": self.prompt_tokens_NxP,
            "prompt_valid_NxP": self.prompt_valid_NxP,
            "example_ids_N": self.ids_N,
        }


def save_ranked_set(path: str | os.PathLike, ranked: RankedSet) -> None:
    """Atomically writes a ranked set to `path` (.npz)."""
    save_arrays(path, ranked.arrays())


def load_ranked_set(path: str | os.PathLike) -> RankedSet:
    """Reads a file written by `save_ranked_set` (no pickle), checked as it is made."""
    return RankedSet.from_arrays(load_arrays(path))


def concat_ranked_sets(sets: list[RankedSet]) -> RankedSet:
    """Ranked sets of the same layout (K, L, P) as one set, in order: the arrays that every set
    has, joined along N. Example ids keep their values (the prompt each list belongs to)."""
    if not sets:
        raise ValueError("concat_ranked_sets: no sets")
    prompt_width = lambda r: None if r.prompt_tokens_NxP is None else r.prompt_tokens_NxP.shape[1:]  # noqa: E731
    shapes = {(r.tokens_NxKxL.shape[1:], prompt_width(r)) for r in sets}
    if len(shapes) > 1:
        raise ValueError(f"concat_ranked_sets: sets of different layouts (K, L), (P): {sorted(shapes, key=str)}")
    arrays = [r.arrays() for r in sets]
    names = [name for name in arrays[0] if all(name in a for a in arrays)]
    return RankedSet(**{name: np.concatenate([a[name] for a in arrays], axis=0) for name in names})
