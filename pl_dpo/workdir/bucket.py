"""A workdir in a Google Cloud Storage bucket (`--workdir=gs://bucket/path`): what differs from a folder.

Every file of a run is read and written through etils.epath, which speaks gs:// through gcsfs
(fsspec); Orbax writes checkpoints through TensorStore. Credentials are Google's Application
Default Credentials for all three (`gcloud auth application-default login`, or a VM's service
account). No jax here. What a bucket does not do as a local folder does, and what is done instead:

- No rename, but an object write is atomic: a file is uploaded whole, its content complete before
  the upload starts, so a reader sees the old object or the new one. A folder written by a library
  that only writes local files (the tokenizer, a Hugging Face export) is written to a local
  temporary folder and uploaded file by file, its marker file last (`staged_folder`): it is
  committed once the marker exists. A library that only reads local folders gets a downloaded
  copy (`local_folder`).
- No append: the metric log holds metrics.jsonl in memory and uploads it whole at every commit
  point (`before_commit`: a checkpoint save, a stage's output), so a resumed run finds every record
  up to the work it resumes from. TensorBoard events go through tensorboardX's own gs:// writer.
- TFDS builds (array_record files, local I/O only) go to a local cache (`local_cache_dir`); their
  names hash every input, so runs share them safely.
- No O_EXCL and no process table of other hosts: `BucketLock`.
- gcsfs's listing cache is off: TensorStore and tensorboardX write objects that gcsfs does not see.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import fsspec
import fsspec.config
from etils import epath

log = logging.getLogger(__name__)

SCHEME = "gs://"
# Objects written by TensorStore (Orbax) and tensorboardX are not in gcsfs's listing cache: a cached
# listing would hide them, or show objects deleted since. (setdefault: a user's fsspec config wins.)
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
# gcsfs logs a full traceback for each of its retries of a request that fails; the error it finally raises
# reaches the run, which names it in one line (pl_dpo.main.storage_error).
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
# fsspec says which read-ahead cache it opens each file with, at INFO (which absl's handler prints).
logging.getLogger("fsspec.caching").setLevel(logging.WARNING)


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def is_bucket(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(SCHEME)


def unsupported_scheme(path: str | os.PathLike) -> str | None:
    """`s3` for `s3://b/x`: a URL of a scheme a workdir cannot be (only gs://), else None."""
    path = os.fspath(path)
    return path.split("://", 1)[0] if is_url(path) and not is_bucket(path) else None


def bucket_error(path: str) -> str | None:
    """Why the bucket of `path` cannot be used (missing, no access, no credentials), or None."""
    root = SCHEME + path[len(SCHEME) :].split("/", 1)[0]
    try:
        if not epath.Path(root).exists():
            return f"bucket {root} does not exist or is not visible with these credentials"
    except Exception as e:  # noqa: BLE001 - any failure here is the user's setup: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"cannot reach bucket {root} ({type(e).__name__}: {first}); check the Application Default Credentials"
    return None


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of a URL (gcsfs for gs://), for what epath has no call for: uploads,
    downloads, a create-if-absent."""
    return fsspec.core.url_to_fs(path)[0]


def local_cache_dir() -> str:
    """Per-host folder for what must be local (TFDS builds): $PL_DPO_CACHE, else ~/.cache/pl_dpo."""
    return os.environ.get("PL_DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pl_dpo")


# ----------------------------------------------------------------------------- folders


def upload_file(local: str, remote: str) -> None:
    """One object, visible only once the whole file is uploaded (a failed upload leaves none)."""
    filesystem(remote).put_file(local, remote)


def upload_folder(local: str, remote: str, marker: str | None = None) -> None:
    """Every file under `local` to `remote`, `marker` (a relative path) last: its object commits the folder."""
    files = [os.path.relpath(os.path.join(root, f), local) for root, _, names in os.walk(local) for f in names]
    for rel in sorted(files, key=lambda rel: (rel == marker, rel)):
        upload_file(os.path.join(local, rel), f"{remote.rstrip('/')}/{rel}")


@contextlib.contextmanager
def staged_folder(path: str, marker: str) -> Iterator[str]:
    """A folder to write `path`'s files into, committed whole on a clean exit: complete or absent, never half
    written (a kill mid-write leaves nothing a resumed run would take as done). Complete means `marker` exists.

    Local: a hidden sibling `.<name>.tmp-*`, renamed to `path` (leftovers of a killed run are removed first).
    Bucket: a local temporary folder, uploaded with `marker` last. Nothing is committed on an error."""
    if not is_bucket(path):
        parent, name = os.path.split(os.path.normpath(path))
        os.makedirs(parent, exist_ok=True)
        for leftover in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.isdir(path):  # an incomplete folder (no marker) written in place by an older version
            shutil.rmtree(path)
        os.rename(tmp, path)
        return
    with tempfile.TemporaryDirectory(prefix="pl_dpo_stage_") as tmp:
        yield tmp
        upload_folder(tmp, path, marker)


@contextlib.contextmanager
def local_folder(path: str) -> Iterator[str]:
    """`path` as a local folder for reading: itself, or a downloaded copy of a bucket folder (removed on exit)."""
    if not is_bucket(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pl_dpo_copy_") as tmp:
        _download(epath.Path(path), tmp)
        yield tmp


def _download(src: epath.Path, local: str) -> None:
    for f in src.iterdir():
        if f.is_dir():
            os.makedirs(os.path.join(local, f.name), exist_ok=True)
            _download(f, os.path.join(local, f.name))
        else:
            filesystem(os.fspath(f)).get_file(os.fspath(f), os.path.join(local, f.name))


# ----------------------------------------------------------------------------- commit points

_before_commit: list[Callable[[], None]] = []


def on_commit(flush: Callable[[], None]) -> Callable[[], None]:
    """Runs `flush` before every commit (`before_commit`); returns the function that unregisters it.
    A bucket workdir's metric log uploads itself so: a resumed run finds every record up to the
    work it resumes from. Nothing registers for a local workdir (its log is appended to)."""
    _before_commit.append(flush)
    return lambda: _before_commit.remove(flush) if flush in _before_commit else None


def before_commit() -> None:
    """Called before a checkpoint save or a stage's output is written."""
    for flush in _before_commit:
        flush()


# ----------------------------------------------------------------------------- lock


class BucketLock:
    """`WorkdirLock` of a bucket workdir: the `.lock` object, created with if-generation-match=0
    (GCS refuses a second create: two runs cannot both take a free lock). The holder rewrites it
    every `heartbeat_s` seconds. A lock found is taken over (with a warning) when its holder is
    gone: on this host, its process is gone; on another host, no heartbeat for `stale_s` seconds
    (the next run waits that long, watching: a heartbeat means a live run, refused).

    A holder that has sent no heartbeat for `stale_s` (its storage out of reach) must stop: another run may
    take the workdir over by then. A watchdog calls `on_lost` with one line saying so (`pl_dpo.main` prints
    it and ends the process), which also bounds how long a run waits on a bucket that is gone: gcsfs and
    TensorStore retry each request for minutes.

    Limits: taking over a dead run's lock (delete, then create) and the heartbeat (read, then
    rewrite) are not atomic; two runs started on the same dead workdir within a second of each
    other could both take it, and a heartbeat that finds another run's lock stops with an error in
    the log. Hosts' clocks must agree to well within `stale_s`."""

    def __init__(
        self,
        workdir: str,
        name: str = ".lock",
        heartbeat_s: float | None = None,
        stale_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.path = f"{os.fspath(workdir).rstrip('/')}/{name}"
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else _seconds("PL_DPO_LOCK_HEARTBEAT_S", 30.0)
        self.stale_s = stale_s if stale_s is not None else _seconds("PL_DPO_LOCK_STALE_S", 120.0)
        self.on_lost = on_lost
        self._me: dict | None = None
        self._stop = threading.Event()  # of the heartbeat
        self._released = threading.Event()  # of the watchdog, which also watches the release itself
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()  # of the last heartbeat that reached the bucket
        self._last_error = ""

    def _holder(self) -> dict | None:
        try:
            return json.loads(epath.Path(self.path).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # not a lock of ours: nobody holds it

    def _create(self, me: dict) -> bool:
        try:
            filesystem(self.path).pipe_file(self.path, json.dumps(me).encode(), mode="create")
        except FileExistsError:
            return False
        return True

    def _gone(self, holder: dict, me: dict, locked_error: Callable[[dict], Exception]) -> bool:
        """Whether the holder of the lock is gone; raises `locked_error(holder)` if it runs."""
        if not holder:
            return True
        if holder.get("host") == me["host"]:
            if pid_alive(int(holder.get("pid", -1))):
                raise locked_error(holder)
            return True
        seen = holder.get("heartbeat", 0)
        deadline = time.time() + max(0.0, self.stale_s - (time.time() - seen))
        if time.time() < deadline:
            log.warning(
                "%s is held by pid %s on %s (heartbeat %.0f s ago); taken over if it sends none for %.0f s",
                self.path, holder.get("pid"), holder.get("host"), time.time() - seen, self.stale_s,
            )  # fmt: skip
        while time.time() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 4, max(deadline - time.time(), 0.0)))
            now = self._holder()
            if now is None or now.get("token") != holder.get("token"):
                return False  # released or taken by someone else: look again
            if now.get("heartbeat") != seen:
                raise locked_error(now)
        return True

    def acquire(self, locked_error: Callable[[dict | None], Exception]) -> None:
        """Takes the lock, or raises `locked_error(holder)` (None: could not, another run is starting)."""
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": uuid.uuid4().hex,
            "heartbeat": time.time(),
        }
        for _ in range(3):
            if self._create(me):
                self._me = me
                self._stop.clear()
                self._released.clear()
                self._last_beat = time.monotonic()
                self._thread = threading.Thread(target=self._beat, name="pl_dpo-lock-heartbeat", daemon=True)
                self._thread.start()
                if self.on_lost is not None:
                    threading.Thread(target=self._watch, name="pl_dpo-lock-watchdog", daemon=True).start()
                return
            holder = self._holder()
            if holder is None or not self._gone(holder, me, locked_error):
                continue
            log.warning("taking over the lock of a run that is gone: %s (%s)", self.path, holder)
            if self._holder() == holder:
                epath.Path(self.path).unlink(missing_ok=True)
        raise locked_error(None)  # taken and released again and again: another run is starting

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._holder()
                if not holder or holder.get("token") != self._me["token"]:
                    log.error(
                        "the lock %s was taken by another run (%s): two runs share this workdir", self.path, holder
                    )
                    return
                self._me["heartbeat"] = time.time()
                epath.Path(self.path).write_text(json.dumps(self._me))
                self._last_beat = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; the run goes on until `stale_s`
                self._last_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                log.warning("lock heartbeat of %s failed: %s", self.path, e)

    def _watch(self) -> None:
        # Apart from `_beat`: one heartbeat can itself hang in a client's retries for longer than `stale_s`.
        while not self._released.wait(min(1.0, self.heartbeat_s)):
            silent_s = time.monotonic() - self._last_beat
            if silent_s > self.stale_s:
                cause = f" (last error: {self._last_error})" if self._last_error else ""
                self.on_lost(
                    f"the storage of {self.path.rsplit('/', 1)[0]} has not been reachable for {silent_s:.0f} s{cause}; "
                    "this run stops, as another run may take the workdir over by now; run the same command again "
                    "once it can be reached: it resumes from what is saved"
                )
                return

    def release(self) -> None:
        if self._me is None:
            return
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join()
            holder = self._holder()
            if holder and holder.get("token") == self._me["token"]:
                epath.Path(self.path).unlink(missing_ok=True)
        finally:
            self._released.set()
            self._me = None


def _seconds(variable: str, default: float) -> float:
    """A lock timing from the environment (tests; storage with other latencies), else `default`."""
    value = os.environ.get(variable, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"{variable}={value!r}: expected a number of seconds") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
