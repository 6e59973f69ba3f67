"""Every seed and key of a run's stages, derived from `config.seed` and a stage label in one place.

A stage's randomness depends on the seed and on what the stage is, never on the order stages run in, so a
resumed, re-ordered or multi-process run draws exactly the same samples, orders and batches. The four forms
below predate this module; each stays as it was so that workdirs (and the demo's results) stay reproducible.
"""

from __future__ import annotations

import zlib

import jax


def _label_hash(*labels: object) -> int:
    return zlib.crc32("/".join(map(str, labels)).encode())


def stage_key(seed: int, *labels: object) -> jax.Array:
    """The sampling key of a stage (`"spin/round_0/samples"`, `"assistant_0/samples"`): stable across runs and
    processes; the sampler folds each prompt's index into it (`sampler.prompt_keys`)."""
    return jax.random.fold_in(jax.random.key(seed), _label_hash(*labels))


def stage_seed(seed: int, *labels: object) -> int:
    """An integer seed for a stage's host-side draws (a round's prompt subset, the order of tied labels)."""
    return seed + _label_hash(*labels)


def sft_seed(seed: int, lineage: str) -> int:
    """The data order and initialisation seed of an SFT phase (πθ(0): lineage "sft", or an assistant)."""
    return seed + _label_hash(lineage) % 1000


def round_seed(seed: int, t: int) -> int:
    """The data order of round t's training (the same for every mode: arms compared at equal batches)."""
    return seed + 7919 * (t + 1)
