"""The workdir as a whole: one run at a time, and the identity of what it was made from
(no jax here, so that tools can import it).

`WorkdirLock` is held by process 0 for the whole run: a second run on the same workdir is
refused at once, naming the run that holds it, instead of both training SFT and one dying
later. A lock left by a killed run (its process is gone) is taken over with a warning.

`input_fingerprints` names every file a run reads besides its config (data files, model and
tokenizer folders), so that a resumed run can refuse data edited in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


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


def input_fingerprints(config) -> dict[str, dict[str, str]]:
    """{config field: {file: fingerprint}} for the data files and the model / tokenizer folders."""
    fields: list[tuple[str, str]] = []
    for split, paths in dict(config.data.get("files", {}) or {}).items():
        for p in [paths] if isinstance(paths, str) else list(paths or []):
            if p:
                fields.append((f"data.files.{split}", p))
    for name, path in (
        ("model.hf_path", config.model.get("hf_path")),
        ("tokenizer.path", config.tokenizer.get("path")),
    ):
        if path:
            fields.append((name, path))
    for i, a in enumerate(config.assistants):
        for name, path in (("model.hf_path", a.model.get("hf_path")), ("tokenizer_path", a.get("tokenizer_path"))):
            if path:
                fields.append((f"assistants[{i}].{name}", path))
    out: dict[str, dict[str, str]] = {}
    for field, path in fields:
        for f in _files(os.fspath(path)):
            out.setdefault(field, {})[os.path.abspath(f)] = file_fingerprint(f)
    return out


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
        self._held = False

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # written by a process killed mid-write: nobody can hold it

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
                holder = self._holder()
                if holder is None:
                    continue  # released in between: try again
                if holder and (holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1)))):
                    raise WorkdirLocked(
                        f"workdir {os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('since')}; wait for that run to end, or delete "
                        f"{self.path} if it is gone"
                    ) from None
                log.warning("taking over the lock of a run that is gone: %s (%s)", self.path, holder)
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return
        raise WorkdirLocked(f"could not take {self.path}: another run is starting on the same workdir")

    def release(self) -> None:
        if self._held:
            self._held = False
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
