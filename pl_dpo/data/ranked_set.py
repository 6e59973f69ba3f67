"""A round's ranked set on disk: numpy arrays in one .npz, written atomically.

`save_ranked_set` writes to a temporary file in the same folder, fsyncs it and
renames it over the target, so a reader sees either the old complete file or
the new complete one, never half of one. Loading uses allow_pickle=False: the
file can hold plain numeric / bool arrays only.

A URL path (a gs:// bucket workdir) is one object: written to a local temporary file, then
uploaded whole (the object appears only once the upload is complete), read back whole.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from etils import epath


def save_ranked_set(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Atomically writes `arrays` (name -> numeric/bool array) to `path` (.npz)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"save_ranked_set: {path!r} must end with .npz")
    if not arrays:
        raise ValueError("save_ranked_set: no arrays")
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "biuf":
            raise ValueError(f"save_ranked_set: {key} has dtype {a.dtype}; only bool/int/float arrays are stored")
    if "://" in path:
        import fsspec

        with tempfile.TemporaryDirectory(prefix="pl_dpo_npz_") as tmp:
            local = os.path.join(tmp, "set.npz")
            np.savez(local, **{k: np.asarray(v) for k, v in arrays.items()})
            fsspec.core.url_to_fs(path)[0].put_file(local, path)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def concat_ranked_sets(sets: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Ranked sets of the same layout (K, L, P) as one set, in order: the arrays that every set
    has, joined along N. Example ids keep their values (the prompt each list belongs to)."""
    if not sets:
        raise ValueError("concat_ranked_sets: no sets")
    shapes = {(a["tokens_NxKxL"].shape[1:], a.get("prompt_tokens_NxP", np.zeros((0, 0))).shape[1:]) for a in sets}
    if len(shapes) > 1:
        raise ValueError(f"concat_ranked_sets: sets of different layouts (K, L), (P): {sorted(shapes)}")
    keys = [k for k in sets[0] if all(k in a for a in sets)]
    return {k: np.concatenate([a[k] for a in sets], axis=0) for k in keys}


def load_ranked_set(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a file written by `save_ranked_set` into memory (no pickle)."""
    path = os.fspath(path)
    if "://" in path:
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"ranked set not found: {path!r}")
        with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ranked set not found: {path!r}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
