"""pl_dpo.training.preemption: SIGTERM -> `reached` at the next step, the handler's lifetime, the
several-process path (JAX's preemption sync point, no Python handler) and `Preempted` (exit code 143).

The signals are real (sent to this process); every test puts back the SIGTERM handler it found."""

from __future__ import annotations

import os
import signal

import jax
import pytest
from jax.experimental import multihost_utils

from pl_dpo.training import preemption
from pl_dpo.training.preemption import Preempted, Preemption


@pytest.fixture
def outer_handler():
    """A SIGTERM handler installed before the phase's (what a second SIGTERM must reach), recording its calls."""
    calls = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, original)


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread before os.kill returns to the test


def test_sigterm_turns_reached_true_at_the_next_step(outer_handler):
    p = Preemption()
    p.install_sigterm_handler()
    try:
        assert not p.requested
        assert [p.reached(step) for step in range(3)] == [False, False, False]
        _sigterm()
        assert p.requested and p.reached(3) and p.reached(4)  # from the next step on, until the run exits
        assert outer_handler == []  # the phase's handler took the signal, not the one before it
        assert not p.should_exit  # not before the phase saved its state
        p.saved_step = 3
        assert p.should_exit
    finally:
        p.restore_handler()


def test_first_sigterm_gives_back_the_previous_handler(outer_handler):
    """A second SIGTERM is not swallowed: it reaches the handler that was there before."""
    p = Preemption()
    p.install_sigterm_handler()
    try:
        phase_handler = signal.getsignal(signal.SIGTERM)
        assert phase_handler is not signal.SIG_DFL and not outer_handler
        _sigterm()
        assert p.requested and outer_handler == []
        assert signal.getsignal(signal.SIGTERM) is not phase_handler
        _sigterm()
        assert outer_handler == [signal.SIGTERM]
    finally:
        p.restore_handler()


def test_restore_handler_puts_the_previous_handler_back(outer_handler):
    before = signal.getsignal(signal.SIGTERM)
    p = Preemption()
    p.install_sigterm_handler()
    assert signal.getsignal(signal.SIGTERM) is not before
    p.restore_handler()
    assert signal.getsignal(signal.SIGTERM) is before
    p.restore_handler()  # a second call changes nothing
    assert signal.getsignal(signal.SIGTERM) is before
    _sigterm()  # after the phase: the outer handler gets it, the phase's state does not change
    assert outer_handler == [signal.SIGTERM] and not p.requested and not p.reached(0)


def test_without_a_handler_nothing_is_reached(outer_handler):
    p = Preemption()
    _sigterm()
    assert outer_handler == [signal.SIGTERM]
    assert not p.requested and not p.reached(0) and not p.should_exit


def test_several_processes_use_the_preemption_sync_point(monkeypatch, outer_handler):
    """With several processes JAX's preemption service owns SIGTERM: no Python handler is installed, and
    `reached` is the processes' agreed sync point (asked at every step, as every process must)."""
    asked = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or step == 5)
    before = signal.getsignal(signal.SIGTERM)
    p = Preemption()
    p.install_sigterm_handler()
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.reached(step) for step in range(4, 7)] == [False, True, False]
    assert asked == [4, 5, 6]
    assert p.requested  # set by the sync point
    p.requested = True  # a flag one process set alone must not decide: all processes stop at the same step
    assert not p.reached(7) and asked[-1] == 7
    p.restore_handler()
    assert signal.getsignal(signal.SIGTERM) is before


def test_preempted_exits_with_143():
    assert issubclass(Preempted, SystemExit)
    with pytest.raises(SystemExit) as info:
        raise Preempted("saved at step 7 of 20")
    assert info.value.code == 143
    assert info.value.message == "saved at step 7 of 20"
    assert isinstance(info.value, preemption.Preempted)
