"""Crash-safe file writing and checked checkpoint loading for continual runs.

Every file is written to a temporary file in the target's directory, flushed,
``fsync``-ed and then moved over the target with :func:`os.replace`, so a run
killed mid-write leaves either the old file or the new one, never half a file.

A continual checkpoint is a plain dict (loadable with ``weights_only=True``)::

    {"anomalib_moleflow_continual": 1,          # format marker
     "run_state": {"task_names": [...], "completed_tasks": 2, "complete": False},
     ...caller's payload (state dicts, results dict, ...)}

``completed_tasks`` counts tasks whose training *and* evaluation finished;
``complete`` is set only by :meth:`RunState.mark_complete`, once every task is
done, so a stopped run never leaves a checkpoint that loads as complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "CheckpointError",
    "RunState",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_run_checkpoint",
    "safe_torch_load",
    "save_run_checkpoint",
]

#: Marker key (and its value) that every continual checkpoint of this package carries.
FORMAT_KEY = "anomalib_moleflow_continual"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, inconsistent or not one of ours; names the file."""


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (best effort; not possible on every OS)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on clean exit move it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wb"):
        msg = f"atomic_open needs mode 'w' or 'wb', got {mode!r}"
        raise ValueError(msg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            # mkstemp makes the file 0600; give it the old file's mode, or rw-r--r--.
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:  # noqa: ANN401 - any JSON value
    """Write ``obj`` as strict JSON (``NaN`` is refused; use ``None``) atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:  # noqa: ANN401 - anything torch.save takes
    """``torch.save(obj, path)`` through a temporary file, flushed, fsync-ed and renamed."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def safe_torch_load(path: str | Path, require_format: bool = True) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True``.

    Args:
        path: Checkpoint file.
        require_format: Also require the :data:`FORMAT_KEY` marker of this package.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder).
        CheckpointError: the file is truncated, corrupt, holds objects that
            ``weights_only`` loading refuses, or is not a continual checkpoint.
    """
    path = Path(path)
    if not path.exists():
        msg = f"Checkpoint file '{path}' does not exist."
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"Checkpoint path '{path}' is not a file."
        raise FileNotFoundError(msg)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        size = path.stat().st_size
        msg = (
            f"Cannot load checkpoint '{path}' ({size} bytes): {type(exc).__name__}: {str(exc).strip()[:300]}. "
            "The file is truncated or corrupt (e.g. the run was killed while writing it, or the disk is full), "
            "or it is not a torch checkpoint saved by anomalib_moleflow. Delete it to restart from the "
            "previous checkpoint."
        )
        raise CheckpointError(msg) from exc
    if require_format:
        if not isinstance(obj, dict) or FORMAT_KEY not in obj:
            msg = (
                f"'{path}' is a torch file but not an anomalib_moleflow continual checkpoint "
                f"(no '{FORMAT_KEY}' marker key). Point to a checkpoint written by the continual runner."
            )
            raise CheckpointError(msg)
        if obj[FORMAT_KEY] != FORMAT_VERSION:
            msg = (
                f"Checkpoint '{path}' has format version {obj[FORMAT_KEY]!r}; this version of "
                f"anomalib_moleflow reads version {FORMAT_VERSION}."
            )
            raise CheckpointError(msg)
    return obj


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
    reserved = {FORMAT_KEY, "run_state"} & set(payload)
    if reserved:
        msg = f"payload may not use the reserved keys {sorted(reserved)}"
        raise ValueError(msg)
    return atomic_torch_save({FORMAT_KEY: FORMAT_VERSION, "run_state": run_state.to_dict(), **payload}, path)


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
            from ``expected_tasks`` (resuming with another task stream).
    """
    checkpoint = safe_torch_load(path)
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
