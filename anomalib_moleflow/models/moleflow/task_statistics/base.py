"""The one mechanism for per-expert statistics: buffers keyed like the experts, each task with a
``fitted`` flag, created from a state dict on load."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TaskStatistics(nn.Module):
    """A ``ModuleDict`` of per-task buffer holders, each with a boolean ``fitted`` buffer.

    Every per-expert statistic of MoLE-Flow (router prototype, global score, position Gaussian,
    score thresholds) is a subclass: it builds one task's unfitted holder in :meth:`_new_task` and
    fills it in its own ``fit``. Which tasks are fitted is also kept python-side, so a traced or
    exported graph needs no data-dependent test on a buffer.

    Loading a state dict creates the tasks it names (in its order); a task that exists here but
    has no statistics in the state dict (a checkpoint written before the statistic existed) loads
    as unfitted, so it scores as that checkpoint did.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict()
        self._fitted_keys: set[str] = set()

    def _new_task(self) -> nn.Module:
        raise NotImplementedError

    @property
    def task_keys(self) -> list[str]:
        """Task keys in the order they were added."""
        return list(self.tasks.keys())

    def add_task(self, key: str) -> None:
        """Create (unfitted) statistics for task ``key`` on the device of the existing ones."""
        if key not in self.tasks:
            device = next(iter(self.buffers()), torch.zeros(())).device
            self.tasks[key] = self._new_task().to(device)

    def fitted(self, key: str) -> bool:
        """Whether task ``key`` has statistics."""
        return key in self._fitted_keys and key in self.tasks

    @property
    def n_fitted(self) -> int:
        """Number of fitted tasks."""
        return len(self._fitted_keys & set(self.tasks.keys()))

    def _store(self, key: str, **values: torch.Tensor | float) -> None:
        """Create task ``key`` if needed, copy ``values`` into its buffers (cast to their dtype) and
        mark it fitted."""
        self.add_task(key)
        state = self.tasks[key]
        for name, value in values.items():
            buffer = getattr(state, name)
            buffer.copy_(torch.as_tensor(value).to(buffer))
        state.fitted.fill_(True)
        self._fitted_keys.add(key)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        head = prefix + "tasks."
        keys = list(
            dict.fromkeys(n[len(head) : -len(".fitted")] for n in state_dict if n.startswith(head) and n.endswith(".fitted"))
        )
        keys = [key for key in keys if "." not in key]
        for key in keys:
            self.add_task(key)
        for key, task in self.tasks.items():
            if key not in keys:
                task.fitted.fill_(False)
                for name, buffer in task.named_buffers():
                    state_dict[f"{head}{key}.{name}"] = buffer.clone()
                self._fitted_keys.discard(key)
        super()._load_from_state_dict(state_dict, prefix, *args)
        for key in keys:
            if bool(state_dict[f"{head}{key}.fitted"]):
                self._fitted_keys.add(key)
            else:
                self._fitted_keys.discard(key)
