"""One task's expert trained in its own process, from a base run, and the file it leaves.

Design V4.1: after task 0 nothing shared trains, so the experts of tasks 1..N are independent of
each other. ``continual --run.only_task T --run.base BASE`` loads the base run's last checkpoint
(its tasks must start the configured stream), adds empty placeholder experts up to ``T`` (so the
new expert gets the key ``T``, and the seed ``seed + T``, that it gets in a sequential run), trains
expert ``T`` exactly as the sequential run would and writes ``<output>/expert_TT_<name>.ckpt``::

    {"anomalib_moleflow_expert": 1, "task": T, "state_dict": {expert T's tensors only},
     "base_checksum": ..., "stream": ..., "settings": ..., "hyper_parameters": ...,
     "train_seconds": ..., "resume_forced": [...], "checksum": "<sha256 of everything else>"}

:func:`~anomalib_moleflow.continual.merge.merge_parts` assembles a base run and its parts into the
run the sequential training gives.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from anomalib_moleflow.io import (
    DIGEST_KEY,
    CheckpointError,
    atomic_torch_save,
    content_digest,
    remove_stale_temporaries,
    safe_torch_load,
    verify_digest,
)
from anomalib_moleflow.models.moleflow import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.numerics import NonFiniteTrainingError, non_finite_tensors

from .data_check import check_stream_files
from .interruption import StopRequest
from .run_checkpoint import latest_checkpoint
from .run_lock import RunLock
from .runner import ContinualRunner, _check_writable, ddp_helper_process
from .task_stream import TaskStream

__all__ = ["PART_KEY", "PART_VERSION", "check_independent_experts", "load_expert_part", "part_path", "train_expert_part"]

#: Marker key (its value: the format version) of an expert part file.
PART_KEY = "anomalib_moleflow_expert"
PART_VERSION = 1
_SHARED = ("base", "mixer", "context")


def part_path(folder: str | Path, task: int, name: str) -> Path:
    """The file a part run writes for expert ``task`` (``name``: its task name)."""
    return Path(folder) / f"expert_{task:02d}_{name}.ckpt"


def check_independent_experts(config: MoLEFlowConfig) -> None:
    """Raise unless nothing shared trains after task 0 (else an expert depends on the ones before it)."""
    thawed = [f"model.config.flow.freeze_{g}_after_task0" for g in _SHARED if not getattr(config.flow, f"freeze_{g}_after_task0")]
    if thawed:
        msg = f"experts can train apart only when nothing shared trains after task 0, but {', '.join(thawed)} is false"
        raise ValueError(msg)


def load_expert_part(path: str | Path) -> dict[str, Any]:
    """A part file, checked (marker, version, checksum); ``path`` may be the folder that holds one."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("expert_*.ckpt"))
        if len(found) != 1:
            msg = f"part folder '{path}' holds {len(found)} expert files (expert_XX_<name>.ckpt); expected one"
            raise FileNotFoundError(msg)
        path = found[0]
    part = safe_torch_load(path)
    if part.get(PART_KEY) != PART_VERSION:
        msg = f"'{path}' is not an expert part file of format {PART_VERSION} (its '{PART_KEY}' is {part.get(PART_KEY)!r})"
        raise CheckpointError(msg)
    verify_digest(part, path)
    part["path"] = str(path)
    return part


def train_expert_part(runner: ContinualRunner, resume: bool = False) -> Path:
    """Train only task ``runner.run_options.only_task`` from ``runner.run_options.base``; returns the part file.

    With ``resume`` an existing part file of the same task and base is kept (nothing trains).
    """
    opts, stream = runner.run_options, runner.stream
    task = opts.only_task
    if task is None or opts.base is None:
        msg = "run.only_task and run.base go together: the task to train and the base run (folder or checkpoint) it starts from"
        raise ValueError(msg)
    if not 0 < task < len(stream):
        msg = f"run.only_task={task} is outside [1, {len(stream) - 1}] for the {len(stream)} tasks of data.tasks"
        raise ValueError(msg)
    check_independent_experts(runner.model_config)
    base = latest_checkpoint(opts.base)
    helper = ddp_helper_process()  # a DDP process besides rank 0: trains along, writes nothing
    if not helper:
        stream.validate()
        check_stream_files(TaskStream([stream.tasks[task]], root=stream.root, num_workers=stream.num_workers))
        _check_writable(runner.output_dir)
    path = part_path(runner.output_dir, task, stream.names[task])
    with nullcontext() if helper else RunLock(runner.output_dir), StopRequest() as runner.stop:
        if not helper:
            remove_stale_temporaries(runner.output_dir)
        checkpoint, state, model, changed = runner.compatible_checkpoint(base)
        base_checksum = checkpoint.get(DIGEST_KEY) or content_digest(checkpoint)
        if path.is_file():
            if resume and load_expert_part(path)["base_checksum"] == base_checksum:
                return path
            msg = f"'{path}' already holds expert {task}; pass --resume true to keep it, or choose another run.output_dir"
            raise FileExistsError(msg)
        if task < state.completed_tasks:
            msg = f"task {task} '{stream.names[task]}' is already trained in the base run '{base}'"
            raise ValueError(msg)
        for index in range(state.completed_tasks, task):  # placeholders: expert `task` gets key `task`
            model.add_task(stream.names[index])
        runner.model = model
        if runner.ogp is not None and checkpoint.get("ogp") is not None:
            runner.ogp.load_state_dict(checkpoint["ogp"])
        before = set(model.state_dict())
        runner._phase(task, "training")  # noqa: SLF001
        seconds = runner.train_task(task)
        runner._stop_if_requested(task)  # noqa: SLF001
        trained = model.state_dict()
        _check_base_unchanged(checkpoint["state_dict"], trained, task)
        expert = {k: v.detach().cpu().clone() for k, v in trained.items() if k not in before}
        bad = non_finite_tensors(expert)
        if bad:
            msg = f"expert {task} '{stream.names[task]}' has non-finite values in {', '.join(bad[:3])}; no part written"
            raise NonFiniteTrainingError(msg)
        part = {
            PART_KEY: PART_VERSION,
            "task": task,
            "state_dict": expert,
            "base_checksum": base_checksum,
            "stream": stream.to_dict(),
            "settings": runner._settings(),  # noqa: SLF001
            "hyper_parameters": {"config": runner.model_config.to_dict()},
            "train_seconds": seconds,
            "resume_forced": [f"expert {task}: {c}" for c in changed],
        }
        part[DIGEST_KEY] = content_digest(part)
        return path if helper else atomic_torch_save(part, path)


def _check_base_unchanged(base: dict[str, Any], trained: dict[str, Any], task: int) -> None:
    """Every tensor of the base model must be bit-identical after training expert ``task``."""
    changed = [k for k, v in base.items() if isinstance(v, torch.Tensor) and not _same(v, trained[k].detach().cpu())]
    if changed:
        msg = f"training expert {task} changed {len(changed)} tensor(s) of the base model ({', '.join(changed[:3])}); it cannot be merged"
        raise RuntimeError(msg)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaN equal to NaN (statistics not fitted)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)
