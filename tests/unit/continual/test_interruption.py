"""SIGTERM / SIGINT recorded as a stop request, and the exit code of an interrupted run."""

from __future__ import annotations

import os
import signal

import pytest

from anomalib_moleflow.continual.interruption import RunInterrupted, StopRequest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_request_and_the_phase(signum: int) -> None:
    before = signal.getsignal(signum)
    with StopRequest() as stop:
        stop.phase = "training of task 1 'gadget'"
        assert not stop.requested
        os.kill(os.getpid(), signum)  # delivered to this (main) thread before kill returns
        stop.phase = "evaluation"
        os.kill(os.getpid(), signum)  # a second signal keeps the first's name and phase
    assert stop.requested and stop.signal_name == signal.Signals(signum).name
    assert stop.phase_at_signal == "training of task 1 'gadget'"
    assert signal.getsignal(signum) == before  # handlers restored


def test_exit_code_is_128_plus_the_signal() -> None:
    assert RunInterrupted("stopped", signal.SIGTERM).exit_code == 143
    assert RunInterrupted("stopped", signal.SIGINT).exit_code == 130
