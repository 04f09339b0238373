"""Stop training after the current batch once a stop was requested (e.g. on SIGTERM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StopOnRequest(Callback):
    """``trainer.should_stop`` once ``requested()`` is true, checked after every training batch.

    Args:
        requested: Whether a stop was requested.
    """

    def __init__(self, requested: Callable[[], bool]) -> None:
        self.requested = requested

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:  # noqa: ANN401
        """Ask Lightning to stop after this batch."""
        del pl_module, args
        if self.requested():
            trainer.should_stop = True
