"""Stopping a continual run on SIGTERM or SIGINT at the next safe point, and saying so.

While :class:`StopRequest` is installed, SIGTERM and SIGINT only set a flag (naming the signal and
the phase the run was in). Training stops after its current batch (the
:class:`~anomalib_moleflow.callbacks.StopOnRequest` callback); the runner then keeps every task
that finished, discards the one in progress and raises :class:`RunInterrupted`, which the command
line turns into a non-zero exit code (128 + the signal number, as a shell reports a killed job).
:func:`protect_workers` keeps a signal sent to the whole process group from killing the
``DataLoader`` workers under the run's feet.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from types import FrameType, TracebackType
from typing import Any

from torch.utils.data import DataLoader

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


def ignore_stop_signals(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """``worker_init_fn`` of a ``DataLoader`` worker: SIGTERM and SIGINT are left to the main process.

    A signal sent to the whole process group (Ctrl-C in a terminal, ``timeout``, Slurm's ``scancel``)
    reaches the workers too; one that died of it would turn the clean stop of the main process into
    a "DataLoader worker exited unexpectedly" failure. The main process stops the workers itself.
    ``then`` is the loader's own ``worker_init_fn``, run afterwards."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def _protected(make_loader: Callable[[], Any]) -> Callable[[], Any]:
    def make() -> Any:  # noqa: ANN401 - a DataLoader, or whatever the datamodule returns
        loader = make_loader()
        if isinstance(loader, DataLoader) and loader.num_workers > 0:
            loader.worker_init_fn = partial(ignore_stop_signals, then=loader.worker_init_fn)
        return loader

    return make


def protect_workers(datamodule: Any) -> Any:  # noqa: ANN401 - an anomalib / Lightning datamodule
    """Make the workers of ``datamodule``'s train, val, test and predict loaders ignore stop signals
    (:func:`ignore_stop_signals`); returns the same datamodule."""
    for name in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
        if hasattr(datamodule, name):
            setattr(datamodule, name, _protected(getattr(datamodule, name)))
    return datamodule
