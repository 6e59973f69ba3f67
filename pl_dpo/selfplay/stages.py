"""A run's stages on disk: an output is loaded when an earlier run committed it, else made and saved.

Every write is atomic (a temporary file, then a rename; in a bucket, one object upload) and made
by process 0 only, so a killed run never leaves a half-written output that a resumed run would
take as committed. Before it, a bucket workdir's metric log is uploaded (`bucket.before_commit`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from etils import epath

from pl_dpo.data import DamagedFile, RankedSet, load_arrays, save_arrays, save_ranked_set
from pl_dpo.selfplay.modes import TokenIds
from pl_dpo.workdir import bucket
from pl_dpo.workdir.layout import atomic_write_text

log = logging.getLogger(__name__)

T = TypeVar("T")


def load_or_make(saved: bool, load: Callable[[], T], make: Callable[[], T], save: Callable[[T], None]) -> T:
    """A stage's output: loaded when committed by an earlier run, else made and saved. An output on disk that
    cannot be read (damaged) is made again: it is derived data, and the stage's seeds make it the same."""
    if saved:
        try:
            return load()
        except DamagedFile as e:
            log.warning("%s; making it again", e)
    value = make()
    save(value)
    return value


def write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        bucket.before_commit()
        atomic_write_text(path, json.dumps(obj))


def read_json(path: str) -> Any:
    return json.loads(epath.Path(path).read_text(encoding="utf-8"))


def exists(path: str) -> bool:
    """Whether a stage's output file is committed (a local file, or a bucket object)."""
    return epath.Path(path).exists()


def save_ranked(path: str, ranked: RankedSet) -> None:
    """A round's ranked (or mixed) set, committed by process 0."""
    if jax.process_index() == 0:
        bucket.before_commit()
        save_ranked_set(path, ranked)


def save_samples(path: str, responses: list[TokenIds], pad_id: int) -> None:
    """Variable-length sampled responses (samples.npz) as one padded array with their lengths."""
    tokens = np.full((len(responses), max(len(r) for r in responses)), pad_id, np.int32)
    for i, r in enumerate(responses):
        tokens[i, : len(r)] = r
    if jax.process_index() == 0:
        bucket.before_commit()
        save_arrays(path, {"tokens": tokens, "lengths": np.array([len(r) for r in responses], np.int32)})


def load_samples(path: str) -> list[TokenIds]:
    z = load_arrays(path)
    return [row[:n].tolist() for row, n in zip(z["tokens"], z["lengths"])]
