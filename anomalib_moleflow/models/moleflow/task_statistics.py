"""Per-task statistics kept as buffers, keyed like the experts (shared by the scoring modules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PerTaskStatistics(nn.Module):
    """A ``ModuleDict`` of per-task buffer holders, each with a boolean ``fitted`` buffer.

    Which tasks are fitted is also kept python-side (``_fitted_keys``), so a traced or
    exported graph needs no data-dependent test on a buffer.

    Subclasses build one task's (unfitted) buffer holder in ``_new_task``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict()
        self._fitted_keys: set[str] = set()

    def _new_task(self) -> nn.Module:
        raise NotImplementedError

    def add_task(self, key: str) -> None:
        """Create (unfitted) statistics for task ``key``."""
        if key not in self.tasks:
            device = next(iter(self.buffers()), torch.zeros(())).device
            self.tasks[key] = self._new_task().to(device)

    def fitted(self, key: str) -> bool:
        """Whether task ``key`` has statistics."""
        return key in self._fitted_keys and key in self.tasks

    def _mark_fitted(self, key: str) -> None:
        self.tasks[key].fitted.fill_(True)
        self._fitted_keys.add(key)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """Create the tasks named in ``state_dict`` first; afterwards record which are fitted.

        A task that exists here but has no statistics in ``state_dict`` (a checkpoint written
        before this module existed) loads as unfitted, so it scores as that checkpoint did.
        """
        head = prefix + "tasks."
        keys = {n[len(head) : -len(".fitted")] for n in state_dict if n.startswith(head) and n.endswith(".fitted")}
        keys = {key for key in keys if "." not in key}
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
