"""Metrics to a JSONL file and TensorBoard event files (tensorboardX: no TensorFlow).

Only process 0 writes. Each record carries the phase (e.g. "sft", "spin/round_1")
and the step; vector metrics (per rank position) are written to TensorBoard as one
scalar per position (`scores_K/0`, `scores_K/1`, ...).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from pl_dpo.workdir import atomic_write_text


class MetricLog:
    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self._active:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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

    def drop(self, from_steps: dict[str, int]) -> None:
        """Removes the JSONL records of each phase with step >= its `from_steps[phase]`, in one
        rewrite of the file: a resumed phase logs those steps again, so the file keeps one record
        per step. (TensorBoard keeps both: it can only purge by step across every tag of a run.)"""
        if not self._active:
            return
        path = self._jsonl.name
        self._jsonl.close()
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()

        def keep(line: str) -> bool:
            try:
                record = json.loads(line)
            except ValueError:
                return True  # not ours to judge
            phase = record.get("phase")
            return phase not in from_steps or record.get("step", -1) < from_steps[phase]

        atomic_write_text(path, "".join(line for line in lines if keep(line)))
        self._jsonl = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._active:
            self._jsonl.close()
            self._tb.close()
