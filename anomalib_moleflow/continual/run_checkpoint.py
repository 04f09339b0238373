"""The checkpoint a continual run writes after each task, and its checked loading.

A run checkpoint is a plain dict (loadable with ``weights_only=True``), written atomically::

    {"anomalib_moleflow_continual": 2,          # format marker and version
     "run_state": {"task_names": [...], "completed_tasks": 2, "complete": False},
     "pytorch-lightning_version": ..., "state_dict": ..., "hyper_parameters": {...},   # the model
     "results": ..., "stream": ..., "settings": ..., "ogp": ...,                    # the run
     "checksum": "<sha256 of everything else>"}

The checksum is verified on every load, so a changed byte is reported as such, naming the file.
The model part is a Lightning checkpoint (``MoLEFlow.from_checkpoint`` and anomalib load it).
Format 1 (until the layered package) kept ``model_config``, ``state_dict`` and ``task_keys`` at
the top level; it still loads.

``completed_tasks`` counts tasks whose training *and* evaluation finished; ``complete`` is set
only by :meth:`RunState.mark_complete`, once every task is done, so a stopped run never leaves a
checkpoint that loads as complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalib_moleflow.io import DIGEST_KEY, CheckpointError, atomic_torch_save, content_digest, safe_torch_load, verify_digest

__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "READABLE_VERSIONS", "RunState", "load_run_checkpoint", "save_run_checkpoint"]

#: Marker key (its value: the format version) that every continual checkpoint of this package carries.
FORMAT_KEY = "anomalib_moleflow_continual"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class RunState:
    """Progress of a continual run, stored in each checkpoint under ``"run_state"``."""

    task_names: list[str] = field(default_factory=list)
    completed_tasks: int = 0
    complete: bool = False

    def __post_init__(self) -> None:
        self.task_names = [str(name) for name in self.task_names]
        n = len(self.task_names)
        if not 0 <= self.completed_tasks <= n:
            msg = f"completed_tasks={self.completed_tasks} is outside [0, {n}] for tasks {self.task_names}"
            raise ValueError(msg)
        if self.complete and self.completed_tasks != n:
            msg = f"run marked complete after only {self.completed_tasks} of {n} tasks"
            raise ValueError(msg)

    @property
    def next_task(self) -> int | None:
        """Index of the next task to train, ``None`` when all are done."""
        return self.completed_tasks if self.completed_tasks < len(self.task_names) else None

    def mark_task_done(self, task: int) -> None:
        """Record that task ``task`` finished (training and evaluation); tasks finish in order."""
        if task != self.completed_tasks:
            msg = f"task {task} finished, but the next unfinished task is {self.completed_tasks}"
            raise ValueError(msg)
        self.completed_tasks += 1

    def mark_complete(self) -> None:
        """Mark the whole run complete; only allowed once every task is done."""
        if self.completed_tasks != len(self.task_names):
            msg = f"cannot mark the run complete: {self.completed_tasks} of {len(self.task_names)} tasks done"
            raise ValueError(msg)
        self.complete = True

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (safe for ``weights_only`` loading and JSON)."""
        return {"task_names": list(self.task_names), "completed_tasks": self.completed_tasks, "complete": self.complete}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            task_names=list(data["task_names"]),
            completed_tasks=int(data["completed_tasks"]),
            complete=bool(data["complete"]),
        )


def save_run_checkpoint(path: str | Path, run_state: RunState, payload: dict[str, Any]) -> Path:
    """Atomically save ``payload`` plus the format marker and ``run_state``.

    Call it only after a task has fully finished (``run_state.mark_task_done``),
    and with ``run_state.complete`` only at the very end of the run.
    """
    reserved = {FORMAT_KEY, "run_state", DIGEST_KEY} & set(payload)
    if reserved:
        msg = f"payload may not use the reserved keys {sorted(reserved)}"
        raise ValueError(msg)
    checkpoint = {FORMAT_KEY: FORMAT_VERSION, "run_state": run_state.to_dict(), **payload}
    checkpoint[DIGEST_KEY] = content_digest(checkpoint)
    return atomic_torch_save(checkpoint, path)


def load_run_checkpoint(
    path: str | Path,
    expected_tasks: Sequence[str] | None = None,
) -> tuple[dict[str, Any], RunState]:
    """Load a checkpoint written by :func:`save_run_checkpoint`.

    Returns:
        ``(checkpoint dict, RunState)``.

    Raises:
        FileNotFoundError / CheckpointError: see :func:`safe_torch_load`; also when
            the run state is malformed or inconsistent, or its task list differs
            from ``expected_tasks`` (resuming with another task stream), or it is not a
            continual checkpoint of a format this version reads.
    """
    checkpoint = safe_torch_load(path)
    if FORMAT_KEY not in checkpoint:
        msg = (
            f"'{path}' is a torch file but not an anomalib_moleflow continual checkpoint "
            f"(no '{FORMAT_KEY}' marker key). Point to a checkpoint written by the continual runner."
        )
        raise CheckpointError(msg)
    if checkpoint[FORMAT_KEY] not in READABLE_VERSIONS:
        msg = (
            f"Checkpoint '{path}' has format version {checkpoint[FORMAT_KEY]!r}; this version of "
            f"anomalib_moleflow reads versions {', '.join(map(str, READABLE_VERSIONS))}."
        )
        raise CheckpointError(msg)
    if checkpoint[FORMAT_KEY] >= 2 and DIGEST_KEY not in checkpoint:
        msg = f"Checkpoint '{path}' (format {checkpoint[FORMAT_KEY]}) has no checksum: it was not written by save_run_checkpoint."
        raise CheckpointError(msg)
    verify_digest(checkpoint, path)
    try:
        run_state = RunState.from_dict(checkpoint["run_state"])
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"Checkpoint '{path}' has a missing or inconsistent 'run_state': {type(exc).__name__}: {exc}"
        raise CheckpointError(msg) from exc
    if expected_tasks is not None and list(expected_tasks) != run_state.task_names:
        msg = (
            f"Checkpoint '{path}' belongs to a run over the tasks {run_state.task_names}, but the "
            f"configured task stream is {list(expected_tasks)}; resume with the same tasks in the same "
            "order, or start a new run in another output folder."
        )
        raise CheckpointError(msg)
    return checkpoint, run_state
