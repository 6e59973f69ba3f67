"""One run per workdir: `WorkdirLock`, held by process 0 for the whole run (no jax here).

A second run on the same workdir is refused at once, naming the run that holds it, instead of both training
SFT and one dying later. A lock left by a killed run (its process is gone) is taken over with a warning. A
bucket workdir (gs://, `pl_dpo.workdir.bucket`) has its own lock object with a heartbeat (`bucket.BucketLock`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from pl_dpo.workdir import bucket

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# An empty or unreadable lock is held this long after it was made (its maker may still be writing it), then
# taken over as left by a killed run.
EMPTY_LOCK_STALE_S = 60.0


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike, on_storage_lost: Callable[[str], None] | None = None):
        """`on_storage_lost`: called with one line when a bucket workdir cannot be reached for as long as
        another run would wait before taking it over (`bucket.BucketLock`); the caller ends the run."""
        self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
        self._held = False
        self._bucket = None
        if bucket.is_bucket(workdir):
            self._bucket = bucket.BucketLock(os.fspath(workdir), LOCK_NAME, on_lost=on_storage_lost)

    def _locked(self, holder: dict | None) -> WorkdirLocked:
        if holder is None:
            return WorkdirLocked(f"could not take {self.path}: another run is starting on the same workdir")
        return WorkdirLocked(
            f"workdir {os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on "
            f"{holder.get('host')} since {holder.get('since')}; wait for that run to end, or delete "
            f"{self.path} if it is gone"
        )

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # empty or cut: an older version between its create and its write, or killed there

    def acquire(self) -> None:
        if self._bucket is not None:
            self._bucket.acquire(self._locked)
            return
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        # The lock is written whole under a name of its own and linked into place: `.lock` never exists
        # without its content, so a second run never reads an empty lock as one left by a dead run.
        mine = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex}"
        with open(mine, "w", encoding="utf-8") as f:
            json.dump(me, f)
        try:
            for _ in range(2):
                try:
                    self._link(mine)
                except FileExistsError:
                    holder = self._holder()
                    if holder is None:
                        continue  # released in between: try again
                    if not holder and time.time() - self._mtime() < EMPTY_LOCK_STALE_S:
                        raise self._locked(None) from None  # empty: an older version between create and write
                    if holder and (holder.get("host") != me["host"] or bucket.pid_alive(int(holder.get("pid", -1)))):
                        raise self._locked(holder) from None
                    log.warning("taking over the lock of a run that is gone: %s (%s)", self.path, holder)
                    os.remove(self.path)
                    continue
                self._held = True
                return
            raise self._locked(None)
        finally:
            os.remove(mine)

    def _link(self, mine: str) -> None:
        """`mine` as the lock, atomically; FileExistsError when there is one."""
        try:
            os.link(mine, self.path)
        except FileExistsError:
            raise
        except OSError as e:  # no hard links (some FUSE mounts): create exclusively, an instant empty
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f, open(mine, encoding="utf-8") as src:
                f.write(src.read())

    def _mtime(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except FileNotFoundError:
            return 0.0

    def release(self) -> None:
        if self._bucket is not None:
            self._bucket.release()
            return
        if self._held:
            self._held = False
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.release()
            return
        try:  # the error that ended the run is the one to see, not one from releasing (a bucket out of reach)
            self.release()
        except Exception as release_error:  # noqa: BLE001
            log.warning("releasing %s after %s: %s", self.path, exc_type.__name__, release_error)
