"""Sweep helpers: build the list of config overrides that a config's `sweep()` returns.

An override dict maps a dotted config field to a value, e.g. {"loss.T": 0.1, "seed": 1};
experiments/sweep.py turns each dict into one job (`--config.loss.T=0.1 --config.seed=1`).

    product(seed=[0, 1], **{"loss.T": [0.1, 1.0]})   # 4 jobs: every combination
    zip_(**{"data.num_train": [500, 1000], "sft.steps": [100, 200]})  # 2 jobs: pairwise
    concat(product(...), zip_(...))                   # both lists, duplicates dropped
    product(zip_(...), seed=[0, 1, 2])                # lists of dicts combine too
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

Override = dict[str, Any]


def _key(job: Override) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in job.items()))


def _check_axes(axes: dict[str, Sequence[Any]], fn: str) -> None:
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{fn}: axis {name!r} must be a list of values, got {values!r}")
        if len(list(values)) == 0:
            raise ValueError(f"{fn}: axis {name!r} has no values")


def product(*groups: Sequence[Override], **axes: Sequence[Any]) -> list[Override]:
    """Every combination of the given lists of override dicts and of the named axes' values.

    Later axes vary fastest (like itertools.product). A field set by two groups is an error.
    """
    _check_axes(axes, "product")
    factors: list[list[Override]] = [list(g) for g in groups]
    factors += [[{name: v} for v in values] for name, values in axes.items()]
    out = []
    for combo in itertools.product(*factors):
        job: Override = {}
        for part in combo:
            clash = set(job) & set(part)
            if clash:
                raise ValueError(f"product: field(s) {sorted(clash)} set by two axes")
            job.update(part)
        out.append(job)
    return out


def zip_(**axes: Sequence[Any]) -> list[Override]:
    """The i-th job takes the i-th value of every axis; all axes must have the same length."""
    _check_axes(axes, "zip_")
    lengths = {name: len(list(values)) for name, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_: axes have different lengths {lengths}")
    names = list(axes)
    return [dict(zip(names, values)) for values in zip(*(list(axes[n]) for n in names))]


def concat(*lists: Sequence[Override]) -> list[Override]:
    """The lists one after the other, keeping the first of jobs with identical overrides."""
    seen, out = set(), []
    for jobs in lists:
        for job in jobs:
            if _key(job) not in seen:
                seen.add(_key(job))
                out.append(dict(job))
    return out
