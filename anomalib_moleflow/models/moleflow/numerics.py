"""Numerical safety of training: non-finite steps are skipped and counted, and too many stop the task
with a message naming the likely cause; tensors that must be finite are checked by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .config import OptimConfig

CONSECUTIVE_LIMIT = 10
"""Non-finite steps in a row after which a task stops."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients again and again, or a tensor to be saved is not finite."""


class NonFiniteSteps:
    """Counts training steps whose loss or gradients were not finite."""

    def __init__(self) -> None:
        self.total = 0
        self.consecutive = 0
        self.first: tuple[int, int] | None = None  # (epoch, global step)

    def reset(self) -> None:
        """Start counting again (a new fit)."""
        self.__init__()

    def record(self, finite: bool, epoch: int, step: int) -> None:
        """Record one step."""
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.first is None:
            self.first = (epoch, step)

    def check(self, task: str, lr: float) -> None:
        """Raise :class:`NonFiniteTrainingError` once :data:`CONSECUTIVE_LIMIT` steps in a row were skipped."""
        if self.consecutive < CONSECUTIVE_LIMIT:
            return
        epoch, step = self.first or (0, 0)
        msg = (
            f"training of task {task} stopped: {self.consecutive} steps in a row had a non-finite loss or "
            f"gradient ({self.total} skipped in all, the first at epoch {epoch}, step {step}). The likely cause "
            f"is the learning rate (optim.lr={lr:g}; the default is {OptimConfig().lr:g}): lower it."
        )
        raise NonFiniteTrainingError(msg)


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state`` that hold NaN or infinity."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ]
