"""A workdir's config.json: written by the first run, and the fields later runs must agree with.

A resumed run may change what its saved work does not depend on (rounds.num, eval.*, the numerics-only
fields of `layout.NUMERICS_FIELDS`); anything else a stage's output depends on (`layout.STAGE_FIELDS`), and the
content of every file the config names, must be as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from pl_dpo import config_lib
from pl_dpo.config_lib import lookup, plain
from pl_dpo.workdir import layout

# Keys that must not change between runs on one workdir: every stage's (layout.STAGE_FIELDS).
# Not there: rounds.num (more rounds continue a run), eval.* (a change re-evaluates), mesh,
# checkpoint, export_hf.
WORKDIR_KEYS = layout.identity_fields()
INPUTS_KEY = "_inputs"  # config.json: {config field: {file: fingerprint}} (input_fingerprints)


class WorkdirConfigMismatch(ValueError):
    """A workdir's saved work was made under another value of a key that must not change."""


# ----------------------------------------------------------------------------- the files a config names


# Files up to this size are hashed whole; larger ones by size, head and tail (a 1 GB parquet
# file of a TPU VM's bucket mount is not read again at every start).
_WHOLE_HASH_BYTES = 64 << 20
_EDGE_BYTES = 1 << 20


def file_fingerprint(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_HASH_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()[:16]


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    return [path] if os.path.exists(path) else []


def input_fingerprints(config: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
    """{config field: {file: fingerprint}} for the data files and the model / tokenizer folders."""
    fields: list[tuple[str, str]] = []
    for split, paths in dict(config.data.files).items():
        for p in [paths] if isinstance(paths, str) else list(paths or []):
            if p:
                fields.append((f"data.files.{split}", p))
    for name, path in (
        ("model.hf_path", config.model.hf_path),
        ("tokenizer.path", config.tokenizer.path),
    ):
        if path:
            fields.append((name, path))
    for i, a in enumerate(config.assistants):
        for name, path in (("model.hf_path", a.model.hf_path), ("tokenizer_path", config_lib.foreign_tokenizer(a))):
            if path:
                fields.append((f"assistants[{i}].{name}", path))
    out: dict[str, dict[str, str]] = {}
    for field, path in fields:
        for f in _files(os.fspath(path)):
            out.setdefault(field, {})[os.path.abspath(f)] = file_fingerprint(f)
    return out


def _parent(tree: Any, dotted: str) -> tuple[dict | None, str]:
    """The dict holding the last part of `dotted` in a JSON tree (None: a part on the way is missing), and that part."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return (tree if isinstance(tree, dict) else None), leaf


def _without_switched_off(value: Any) -> Any:
    """`value` without the fields of `layout.OFF_BY_DEFAULT` that are off, at any depth."""
    if isinstance(value, list):
        return [_without_switched_off(v) for v in value]
    if not isinstance(value, dict):
        return value
    off = layout.OFF_BY_DEFAULT
    return {k: _without_switched_off(v) for k, v in value.items() if not (k in off and off[k](v))}


def _without_numerics(value: Any, key: str) -> Any:
    """`value` (found at dotted `key`) without the NUMERICS_FIELDS below it: a resumed run may change those."""
    if not isinstance(value, dict):
        return value
    value = copy.deepcopy(value)
    for field in layout.NUMERICS_FIELDS:
        if field.startswith(key + "."):
            node, leaf = _parent(value, field[len(key) + 1 :])
            if node is not None:
                node.pop(leaf, None)
    return value


def check_workdir_config(
    workdir: str | os.PathLike, config: Mapping[str, Any], keys_that_must_match: Sequence[str]
) -> None:
    """Write `workdir/config.json` on the first run; later runs must agree on the given keys.

    Keys may be dotted (`loss.K`). Values are compared after a JSON round trip, so a
    tuple and a list with the same items match. Raises WorkdirConfigMismatch naming
    the key, the old and the new value.
    """
    new = json.loads(json.dumps(plain(config), default=str, sort_keys=True))
    if isinstance(config, ml_collections.ConfigDict):  # the files it names, by content
        new[INPUTS_KEY] = input_fingerprints(config)
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            layout.atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True))
        return
    old = json.loads(path.read_text())
    for field, value in layout.FIELDS_ADDED_LATER.items():  # what an older config.json ran with
        node, leaf = _parent(old, field)
        if node is not None:
            node.setdefault(leaf, value)
    for key in keys_that_must_match:
        a, b = (_without_switched_off(_without_numerics(lookup(c, key), key)) for c in (old, new))
        if a != b:
            field, was, now = _first_difference(a, b, key)
            raise WorkdirConfigMismatch(
                f"workdir {workdir} was written by an incompatible config: {field!r} was {was!r}, now {now!r}, "
                f"and the saved work of {_stages_of(field)} depends on it (see {path}); use a new --workdir or "
                "restore the old value"
            )
    for field, files in (old.get(INPUTS_KEY) or {}).items():
        now = new.get(INPUTS_KEY, {}).get(field, {})
        for file in sorted(set(files) | set(now)):
            if files.get(file) != now.get(file):
                state = "is gone" if file not in now else "is new" if file not in files else "changed"
                raise WorkdirConfigMismatch(
                    f"workdir {workdir}: {file} (config.{field}) {state} since the workdir's saved work "
                    f"({_stages_of(field)}) was made from it; use a new --workdir, or the file as it was"
                )


def _first_difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any]:
    """The first dotted field under `key` where two JSON values differ, with its two values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                return _first_difference(old.get(name), new.get(name), f"{key}.{name}")
    return key, old, new


def _stages_of(field: str) -> str:
    """The stages (layout.STAGE_FIELDS) whose output depends on `field`, e.g. "the sft and rounds stages"."""
    names = [
        stage
        for stage, fields in layout.STAGE_FIELDS.items()
        if any(field == f or field.startswith(f + ".") or f.startswith(field + ".") for f in fields)
    ]
    if not names:
        return "every stage"
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"the {listed} stage{'s' if len(names) > 1 else ''}"
