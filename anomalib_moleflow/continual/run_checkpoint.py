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
checkpoint that loads as complete. A run grows by resuming it over a longer task list that starts
with its own (:meth:`RunState.extended`, :func:`extended_results`); its earlier checkpoints keep
the shorter record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalib_moleflow.io import DIGEST_KEY, CheckpointError, atomic_torch_save, content_digest, safe_torch_load, verify_digest

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "RunState",
    "extended_results",
    "latest_checkpoint",
    "load_run_checkpoint",
    "save_run_checkpoint",
    "task_list_mismatch",
]

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

    def extended(self, task_names: Sequence[str]) -> RunState:
        """This progress within a longer task list that starts with this run's tasks (not complete
        when tasks were added)."""
        mismatch = task_list_mismatch(self.task_names, task_names, allow_more_tasks=True)
        if mismatch:
            msg = f"cannot extend a run over the tasks {self.task_names} to {list(task_names)}: {mismatch}"
            raise ValueError(msg)
        complete = self.complete and len(task_names) == len(self.task_names)
        return RunState(task_names=list(task_names), completed_tasks=self.completed_tasks, complete=complete)

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
    allow_more_tasks: bool = False,
) -> tuple[dict[str, Any], RunState]:
    """Load a checkpoint written by :func:`save_run_checkpoint`.

    Returns:
        ``(checkpoint dict, RunState)``.

    Raises:
        FileNotFoundError / CheckpointError: see :func:`safe_torch_load`; also when
            the run state is malformed or inconsistent, or its task list differs
            from ``expected_tasks`` (resuming with another task stream; with
            ``allow_more_tasks`` the stream may add tasks after the run's), or it is not a
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
    if expected_tasks is not None:
        mismatch = task_list_mismatch(run_state.task_names, expected_tasks, allow_more_tasks)
        if mismatch:
            more = " (new tasks may follow them)" if allow_more_tasks else ""
            msg = (
                f"Checkpoint '{path}' belongs to a run over the tasks {run_state.task_names}, but the "
                f"configured task stream is {list(expected_tasks)}: {mismatch}; resume with the run's tasks in "
                f"the same order{more}, or start a new run in another output folder."
            )
            raise CheckpointError(msg)
    return checkpoint, run_state


def task_list_mismatch(recorded: Sequence[str], stream: Sequence[str], allow_more_tasks: bool = False) -> str | None:
    """Where ``stream`` departs from a run's ``recorded`` tasks (``None``: it matches, or with
    ``allow_more_tasks`` it extends them)."""
    recorded, stream = [str(t) for t in recorded], [str(t) for t in stream]
    for index, (old, new) in enumerate(zip(recorded, stream, strict=False)):
        if old != new:
            return f"task {index} is '{old}' in the run but '{new}' in the stream"
    if len(stream) < len(recorded):
        return f"the stream ends before the run's task {len(stream)} '{recorded[len(stream)]}'"
    if len(stream) > len(recorded) and not allow_more_tasks:
        return f"the stream adds task {len(recorded)} '{stream[len(recorded)]}'"
    return None


def extended_results(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """A run's results dict (``ContinualResults.to_dict``) over more ``tasks``: its task list must start
    with the recorded one; the new tasks' cells are empty (``None``)."""
    tasks = [str(t) for t in tasks]
    mismatch = task_list_mismatch(results["tasks"], tasks, allow_more_tasks=True)
    if mismatch:
        msg = f"cannot extend results over the tasks {results['tasks']} to {tasks}: {mismatch}"
        raise ValueError(msg)
    n = len(tasks)

    def grown(rows: list[list[Any]]) -> list[list[Any]]:
        return [[*row, *[None] * (n - len(row))] for row in rows] + [[None] * n for _ in range(n - len(rows))]

    out = dict(results)
    out["tasks"] = tasks
    for section in ("matrix", "matrix_oracle"):
        if section in results:
            out[section] = {key: grown(rows) for key, rows in results[section].items()}
    return out


def latest_checkpoint(run: str | Path) -> Path:
    """A run's checkpoint: ``run`` itself when it is a file, else the run folder's checkpoint of its
    last task (``<run>/checkpoints/task_XX_<name>.ckpt`` with the highest ``XX``)."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        msg = f"'{run}' is neither a run folder nor a checkpoint file"
        raise FileNotFoundError(msg)
    found = [(int(p.name.split("_")[1]), p) for p in (run / "checkpoints").glob("task_*_*.ckpt") if p.name.split("_")[1].isdigit()]
    if not found:
        msg = f"run folder '{run}' holds no task checkpoint (checkpoints/task_XX_<name>.ckpt)"
        raise FileNotFoundError(msg)
    return max(found)[1]
