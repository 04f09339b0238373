"""Stopping a continual run on SIGTERM or SIGINT at the next safe point, and saying so.

While :class:`StopRequest` is installed, SIGTERM and SIGINT only set a flag (naming the signal and
the phase the run was in). Training stops after its current batch (the
:class:`~anomalib_moleflow.callbacks.StopOnRequest` callback); the runner then keeps every task
that finished, discards the one in progress and raises :class:`RunInterrupted`, which the command
line turns into a non-zero exit code (128 + the signal number, as a shell reports a killed job).
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(RuntimeError):
    """A run stopped on a signal before it completed; the message says where and how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class StopRequest:
    """Records a SIGTERM / SIGINT instead of dying; ``with StopRequest() as stop:``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = "start-up"
        self.phase_at_signal: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "-"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            self.phase_at_signal = self.phase

    def __enter__(self) -> StopRequest:
        for signum in SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous = {}
