"""Preemption, all of it: SIGTERM (one process) or JAX's preemption service (several), and the exit.

At every step boundary a phase asks its `TrainCheckpoints.should_save(step)`, which polls
`Preemption.reached(step)`; once it is reached the phase saves its state at that step and
raises `Preempted`, which `pl_dpo.main` turns into exit code 143. Running the same command
again resumes from that state. Outside a training phase (start-up, compiling, sampling, scoring)
`sigterm_stops_the_run` turns SIGTERM into the same exit, keeping what the workdir holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import Iterator
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """SIGTERM arrived; the phase saved its state and the run must stop (exit code 143)."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message


@dataclasses.dataclass
class Preemption:
    """Polled by the train loop at step boundaries; set by SIGTERM."""

    requested: bool = False
    saved_step: int | None = None  # the step saved because of the request
    _previous_handler: Any = dataclasses.field(default=None, repr=False)

    @property
    def should_exit(self) -> bool:
        return self.saved_step is not None

    def install_sigterm_handler(self) -> None:
        """SIGTERM -> `requested`, so that the loop saves at the next step boundary and exits.

        The previous handler comes back on the first SIGTERM (so a second one kills
        at once) and on `restore_handler()` (so a SIGTERM outside this phase is not
        swallowed). With several processes, JAX's preemption service (started by
        jax.distributed.initialize) already catches SIGTERM and agrees on a common
        step; a Python handler would replace its handler, so none is installed.
        """
        if jax.process_count() > 1:
            return
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            del signum, frame
            log.warning("SIGTERM: saving at the next step boundary, then exiting")
            self.requested = True
            signal.signal(signal.SIGTERM, previous)

        signal.signal(signal.SIGTERM, handler)
        self._previous_handler = previous

    def restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def reached(self, step: int) -> bool:
        """Whether the run must save at `step` and stop. With several processes this is a sync
        protocol: every process calls it at every step, with the same steps."""
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
                return True
            return False
        return self.requested


@contextlib.contextmanager
def sigterm_stops_the_run(workdir: str) -> Iterator[None]:
    """SIGTERM outside a training phase raises `Preempted` where the run is (after the compile or the device
    call in progress: Python handles signals between bytecodes), naming what is kept. Nothing is lost:
    every stage's output is committed atomically, so the workdir holds each finished stage and the
    latest checkpoint of the phase in progress. A phase installs its own handler over this one (it saves
    first), and gives this one back when it ends. One process only, as `install_sigterm_handler`."""
    if jax.process_count() > 1:
        yield
        return

    def handler(signum, frame):
        del signum, frame
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Preempted(
            f"SIGTERM: stopped; {workdir} keeps every finished stage and the last saved state of the phase in "
            "progress; run the same command again to resume"
        )

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
