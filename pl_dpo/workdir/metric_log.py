"""Metrics to a JSONL file and TensorBoard event files (tensorboardX: no TensorFlow).

Only process 0 writes. Each record carries the phase (e.g. "sft", "spin/round_1")
and the step; vector metrics (per rank position) are written to TensorBoard as one
scalar per position (`scores_K/0`, `scores_K/1`, ...).

In a bucket workdir (gs://), where an object cannot be appended to, metrics.jsonl is held in memory
and the TensorBoard event files are written to a local temporary folder; both are uploaded whole
before every commit (`bucket.before_commit`: a checkpoint save, a stage's output), at least every
`SYNC_SECONDS` and at the end. A run killed in between loses only records of work that was not
committed, which the resumed run logs again. (tensorboardX's own gs:// writer is not used: it
uploads the whole file at every flush and once more from `__del__` after `close`, at interpreter
exit, where it retries for minutes if the bucket is out of reach.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
from etils import epath

from pl_dpo.workdir import bucket
from pl_dpo.workdir.layout import atomic_write_text

log = logging.getLogger(__name__)

SYNC_SECONDS = 60.0  # a bucket workdir's metric log is uploaded at least this often while it is written


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch wherever it is installed,
    only to take torch tensors as values, and this log writes floats. That import is 2 s of every run (and of
    every test's run) on a machine with torch. torch stays importable after."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects and skips
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:  # a tensorboardX that needs torch where it is there: imported again, with it
        for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"]:
            del sys.modules[name]
    finally:
        del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


class _ObjectText:
    """metrics.jsonl of a bucket workdir: the lines in memory (an object cannot be appended to), the
    object rewritten whole by `sync`. The file interface MetricLog uses: name, write, flush, close."""

    def __init__(self, path: str):
        self.name = path
        p = epath.Path(path)
        self.lines = p.read_text(encoding="utf-8").splitlines(keepends=True) if p.exists() else []
        if self.lines and not self.lines[-1].endswith("\n"):
            log.warning("%s: dropped its last line, cut mid-record: %r", path, self.lines.pop()[:80])
        self._synced = len(self.lines)
        self._changed = False

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass  # MetricLog.sync uploads

    def replace(self, lines: list[str]) -> None:
        self.lines, self._changed = lines, True

    def sync(self) -> None:
        if self._changed or len(self.lines) != self._synced:
            atomic_write_text(self.name, "".join(self.lines))
            self._synced, self._changed = len(self.lines), False

    def close(self) -> None:
        self.sync()


def _cut_to_last_record(path: str) -> None:
    """A metrics.jsonl cut mid-record (a run killed, or out of disk, while writing) ends at its last complete
    record again, so the resumed run's records start on a line of their own."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1  # records are appended whole, one per line: only the last can be cut
        log.warning("%s: dropped its last line, cut mid-record: %r", path, data[keep:][:80])
        f.truncate(keep)


class MetricLog:
    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._unregister = None
        self._bucket = bucket.is_bucket(workdir)
        if self._active:
            path, tb_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard")
            if self._bucket:
                self._jsonl = _ObjectText(path)
                self._tb_remote = tb_dir
                self._tb_local = tb_dir = tempfile.mkdtemp(prefix="pl_dpo_tensorboard_")
                self._tb_uploaded: dict[str, int] = {}  # event file -> bytes uploaded
                self._last_sync = time.monotonic()
                self._unregister = bucket.on_commit(self.sync)
            else:
                os.makedirs(workdir, exist_ok=True)
                _cut_to_last_record(path)
                self._jsonl = open(path, "a", encoding="utf-8")
            self._tb = _summary_writer()(tb_dir)

    def write(self, phase: str, step: int, metrics: dict[str, Any], global_step: int | None = None) -> None:
        if not self._active:
            return
        record = {"phase": phase, "step": int(step), "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        gstep = step if global_step is None else global_step
        for key, value in metrics.items():
            if isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"{phase}/{key}/{i}", v, gstep)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{phase}/{key}", value, gstep)
        if self._bucket and time.monotonic() - self._last_sync > SYNC_SECONDS:
            self.sync()

    @contextlib.contextmanager
    def timed(self, stage: str, work: str) -> Iterator[None]:
        """Logs the wall time of `work` (generation, reference_scoring, training) of a stage as a record of phase
        `timing/<work>`, so a run says where its time went (`benchmarks/self_play_round.py` reads them)."""
        start = time.perf_counter()
        yield
        self.write(f"timing/{work}", 0, {"stage": stage, "seconds": time.perf_counter() - start})

    def drop(self, from_steps: dict[str, int]) -> None:
        """Removes the JSONL records of each phase with step >= its `from_steps[phase]`, in one
        rewrite of the file: a resumed phase logs those steps again, so the file keeps one record
        per step. (TensorBoard keeps both: it can only purge by step across every tag of a run.)"""
        if not self._active:
            return

        def keep(line: str) -> bool:
            try:
                record = json.loads(line)
            except ValueError:
                return True  # not ours to judge
            phase = record.get("phase")
            return phase not in from_steps or record.get("step", -1) < from_steps[phase]

        if self._bucket:
            self._jsonl.replace([line for line in self._jsonl.lines if keep(line)])
            return
        path = self._jsonl.name
        self._jsonl.close()
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        atomic_write_text(path, "".join(line for line in lines if keep(line)))
        self._jsonl = open(path, "a", encoding="utf-8")

    def sync(self) -> None:
        """A bucket workdir's records and events uploaded now (called before every commit)."""
        if not (self._active and self._bucket):
            return
        self._jsonl.sync()
        self._tb.flush()
        self._upload_events()
        self._last_sync = time.monotonic()

    def _upload_events(self) -> None:
        for name in sorted(os.listdir(self._tb_local)):
            size = os.path.getsize(os.path.join(self._tb_local, name))
            if self._tb_uploaded.get(name) != size:
                bucket.upload_file(os.path.join(self._tb_local, name), f"{self._tb_remote}/{name}")
                self._tb_uploaded[name] = size

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # the error that ended the run is the one to see, not a second one from closing (a full disk)
            self.close()
        except Exception as close_error:  # noqa: BLE001
            log.warning("closing the metric log after %s: %s", exc_type.__name__, close_error)

    def close(self) -> None:
        if self._active:
            if self._unregister is not None:
                self._unregister()
            self._tb.close()
            self._jsonl.close()
            if self._bucket:
                self._upload_events()
                shutil.rmtree(self._tb_local, ignore_errors=True)
