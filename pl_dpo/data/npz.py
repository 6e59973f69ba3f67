"""Named numpy arrays in one .npz file, written atomically (ranked sets, a stage's cached samples).

`save_arrays` writes to a temporary file in the same folder, fsyncs it and
renames it over the target, so a reader sees either the old complete file or
the new complete one, never half of one. Loading uses allow_pickle=False: the
file can hold plain numeric / bool arrays only.

A URL path (a gs:// bucket workdir) is one object: written to a local temporary file, then
uploaded whole (the object appears only once the upload is complete), read back whole.
"""

from __future__ import annotations

import glob
import io
import os
import tempfile

import numpy as np
from etils import epath

TMP_PREFIX = ".tmp-"  # a file being written; one left beside the target is a killed writer's


class DamagedFile(ValueError):
    """A .npz file that exists but cannot be read whole (flipped bits, cut short)."""


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Atomically writes `arrays` (name -> numeric/bool array) to `path` (.npz)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"save_arrays: {path!r} must end with .npz")
    if not arrays:
        raise ValueError("save_arrays: no arrays")
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "biuf":
            raise ValueError(f"save_arrays: {key} has dtype {a.dtype}; only bool/int/float arrays are stored")
    if "://" in path:
        import fsspec

        with tempfile.TemporaryDirectory(prefix="pl_dpo_npz_") as tmp:
            local = os.path.join(tmp, "set.npz")
            np.savez(local, **{k: np.asarray(v) for k, v in arrays.items()})
            fsspec.core.url_to_fs(path)[0].put_file(local, path)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".npz", dir=folder)
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
    # Half-written files of a run killed mid-save: one writer per workdir (its lock), so none is live.
    for leftover in glob.glob(os.path.join(glob.escape(folder), f"{TMP_PREFIX}*.npz")):
        os.remove(leftover)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a file written by `save_arrays` into memory (no pickle)."""
    path = os.fspath(path)
    if "://" in path:
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f".npz file not found: {path!r}")
        source = io.BytesIO(epath.Path(path).read_bytes())
    elif not os.path.isfile(path):
        raise FileNotFoundError(f".npz file not found: {path!r}")
    else:
        source = path
    try:
        with np.load(source, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError, and SyntaxError from a flipped header
        raise DamagedFile(f"{path} is damaged ({type(e).__name__}: {e})") from e
