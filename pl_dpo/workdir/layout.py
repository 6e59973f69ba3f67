"""The workdir as a whole: one run at a time, and the identity of what it was made from
(no jax here, so that tools can import it).

`WorkdirLock` is held by process 0 for the whole run: a second run on the same workdir is
refused at once, naming the run that holds it, instead of both training SFT and one dying
later. A lock left by a killed run (its process is gone) is taken over with a warning. A bucket
workdir (gs://, `pl_dpo.workdir.bucket`) has its own lock object with a heartbeat (`bucket.BucketLock`).

`input_fingerprints` names every file a run reads besides its config (data files, model and
tokenizer folders), so that a resumed run can refuse data edited in place.

The layout (paths of every stage's output), the "is this committed" check, and one table of
the config fields each stage depends on live here: the workdir check of a resumed run
(agreement.WORKDIR_KEYS) and the sweep's stage sharing (experiments/sweep.py) derive from it.
Paths are strings that etils.epath reads and writes: a local path, or a gs:// URL whose files go
to a bucket (`pl_dpo.workdir.bucket` says what differs there).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence

from etils import epath

from pl_dpo.workdir import bucket

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# ----------------------------------------------------------------------------- stages

# The config fields each stage's output depends on. The assistants' stages also depend on their
# own `assistants[i]` section; rounds.num is absent on purpose (more rounds continue a run).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer",),
    "tfds": ("data.source", "data.options", "data.files"),
    "sft": ("seed", "tokenizer", "model", "data", "sft", "logprob_chunk"),
    "assistant": ("seed", "tokenizer", "data", "sampling", "logprob_chunk"),
    "rounds": (
        "modes",
        "assistants",
        "loss",
        "sampling",
        "rounds.epochs",
        "rounds.batch_size",
        "rounds.optim",
        "rounds.max_steps",
        "rounds.lr_per_round",
        "rounds.mix_previous",
        "rounds.mix_rescore",
        "rounds.answer_on_top",
        "rounds.prompts_per_round",
    ),
}
# Fields added after workdirs were first written: an older config.json without one ran with this value.
FIELDS_ADDED_LATER = {"rounds.prompts_per_round": 0}
# Fields that change only the evaluation: a resumed run evaluates again (eval_<t>.json).
EVAL_FIELDS = ("eval", "sampling.max_new_tokens")
# Fields that change results in their last bits only (the reduction order, the attention kernel,
# what the backward pass recomputes): a resumed run may change them, two jobs that differ in them do not share work.
NUMERICS_FIELDS = ("mesh", "data.pack_prompt", "model.remat", "model.attention_impl", "sampling.decode_tp")


def identity_fields() -> tuple[str, ...]:
    """Every field the saved work depends on: what a resumed run must not change."""
    out: list[str] = []
    for fields in STAGE_FIELDS.values():
        out += [f for f in fields if f not in out]
    return tuple(out)


# ----------------------------------------------------------------------------- layout


def absolute(workdir: str | os.PathLike) -> str:
    """The workdir as every process names it: an absolute local path (Orbax wants one), or the gs:// URL."""
    workdir = os.fspath(workdir)
    return workdir.rstrip("/") if bucket.is_bucket(workdir) else os.path.abspath(workdir)


def tokenizer_dir(workdir: str) -> str:
    """The tiny tokenizer built once when none is configured; `tokenizer.json` commits it."""
    return os.path.join(workdir, "tokenizer")


def tfds_dir(workdir: str) -> str:
    """The TFDS builds of the data sources: in the workdir, or for a bucket workdir in this host's
    local cache (array_record files are local files; a build's name hashes all its inputs)."""
    return (
        os.path.join(bucket.local_cache_dir(), "tfds") if bucket.is_bucket(workdir) else os.path.join(workdir, "tfds")
    )


def compilation_cache_dir(workdir: str) -> str:
    """`<workdir>/jax_cache` (JAX reads and writes a gs:// cache too: a resumed run on a new VM finds it)."""
    return os.path.join(absolute(workdir), "jax_cache")


def lineage_dir(workdir: str, lineage: str) -> str:
    """`sft`, `assistant_<i>` or a mode: its policies, evaluations and phases."""
    return os.path.join(workdir, lineage)


def policy_dir(workdir: str, lineage: str, index: int) -> str:
    return os.path.join(workdir, lineage, "policies", str(index))


def eval_path(workdir: str, lineage: str, index: int) -> str:
    return os.path.join(workdir, lineage, f"eval_{index}.json")


def samples_path(workdir: str, lineage: str) -> str:
    """Cached samples of an assistant or of πθ(0) (lineage `sft`)."""
    return os.path.join(workdir, lineage, "samples.npz")


def round_dir(workdir: str, mode: str, t: int) -> str:
    """Round t of a mode: its ranked set, mixed set and mid-round train state."""
    return os.path.join(workdir, mode, f"round_{t}")


def train_state_dir(phase_dir: str) -> str:
    """A phase's mid-phase train states (TrainCheckpoints); phase_dir is a lineage or a round dir."""
    return os.path.join(phase_dir, "train")


def mixed_set_path(workdir: str, mode: str, t: int) -> str:
    """Round t's ranked set joined by the previous rounds' (rounds.mix_previous)."""
    return os.path.join(round_dir(workdir, mode, t), "mixed.npz")


def ranked_set_path(workdir: str, mode: str, t: int, one_set: bool = False) -> str:
    return (
        os.path.join(workdir, mode, "ranked.npz")
        if one_set
        else os.path.join(round_dir(workdir, mode, t), "ranked.npz")
    )


def export_dir(workdir: str, mode: str, index: int) -> str:
    return os.path.join(workdir, mode, "hf_export", f"round_{index}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `path` under a temporary name, then renames it: a reader sees the old file or the
    new one, never a half-written one (a killed run leaves nothing a resumed run would trust).
    In a bucket an object write is atomic by itself: one upload of the whole text."""
    path = epath.Path(path)
    if bucket.is_bucket(path):
        path.write_text(text)
        return
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)  # overwrites, as os.replace does


CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"


def step_committed(step_dir: str | os.PathLike, items: Sequence[str]) -> bool:
    """An Orbax step is committed when its metadata carries a commit timestamp and every item
    folder exists (a killed save leaves neither)."""
    step_dir = epath.Path(step_dir)
    try:
        committed = json.loads((step_dir / CHECKPOINT_METADATA).read_text()).get("commit_timestamp_nsecs") is not None
    except (OSError, ValueError):
        return False
    return committed and all((step_dir / item).is_dir() for item in items)


def policy_committed(workdir: str, lineage: str, index: int) -> bool:
    return step_committed(policy_dir(workdir, lineage, index), ("params", "metadata"))


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


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
        self._held = False
        self._bucket = bucket.BucketLock(os.fspath(workdir), LOCK_NAME) if bucket.is_bucket(workdir) else None

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
            return {}  # written by a process killed mid-write: nobody can hold it

    def acquire(self) -> None:
        if self._bucket is not None:
            self._bucket.acquire(self._locked)
            return
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
                if holder and (holder.get("host") != me["host"] or bucket.pid_alive(int(holder.get("pid", -1)))):
                    raise self._locked(holder) from None
                log.warning("taking over the lock of a run that is gone: %s (%s)", self.path, holder)
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return
        raise self._locked(None)

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

    def __exit__(self, *exc) -> None:
        self.release()
