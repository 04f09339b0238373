"""Assemble a base run and experts trained apart (:mod:`.expert_parts`) into one continual run.

The merged run is the run the sequential training over the same stream writes: its folder starts
with the base run's checkpoints, then each later task's expert is loaded from its part (instead of
trained) into the model, every task seen so far is evaluated, and ``task_XX_<name>.ckpt`` and the
results are written, exactly as :class:`~.runner.ContinualRunner` does. Training seconds are the
parts' own. Experts, router prototypes, statistics and thresholds are the parts' tensors, so they
are bit-identical to the sequential run's wherever training is (one torch thread on a CPU).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_moleflow.io import DIGEST_KEY, CheckpointError, atomic_open, content_digest
from anomalib_moleflow.models.moleflow import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.checkpoint_format import saved_settings

from .expert_parts import load_expert_part
from .results_tables import ContinualResults
from .run_checkpoint import latest_checkpoint, load_run_checkpoint, task_list_mismatch
from .runner import ContinualRunner, RunOptions, TrainerOptions, _differences
from .task_stream import TaskStream

__all__ = ["merge_parts"]


class _MergingRunner(ContinualRunner):
    """A runner whose tasks after the base load their expert from a part instead of training it."""

    def __init__(self, *args: Any, parts: dict[int, dict[str, Any]], **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self.parts = parts

    def train_task(self, task: int) -> float:
        """Add expert ``task`` and load its tensors from its part; returns the part's train seconds."""
        assert self.model is not None
        part = self.parts[task]
        before = set(self.model.state_dict())
        key = self.model.add_task(self.stream.names[task])
        expected = set(self.model.state_dict()) - before
        if key != str(task) or expected != set(part["state_dict"]):
            missing, extra = sorted(expected - set(part["state_dict"])), sorted(set(part["state_dict"]) - expected)
            msg = f"part '{part['path']}' does not hold expert {task} of this model (missing {missing[:3]}, unexpected {extra[:3]})"
            raise CheckpointError(msg)
        self.model.load_state_dict({**self.model.state_dict(), **part["state_dict"]})
        return float(part["train_seconds"])


def merge_parts(
    base: str | Path,
    parts: Sequence[str | Path],
    output_dir: str | Path,
    resume: bool = False,
    num_workers: int | None = None,
) -> ContinualResults:
    """Merge ``parts`` (part files or their folders) onto ``base`` (run folder or checkpoint) into ``output_dir``.

    Every part must come from this base and the same task stream, and together they must hold each
    task after the base's exactly once. ``resume`` continues a merge that stopped.
    """
    base_path = latest_checkpoint(base)
    checkpoint, state = load_run_checkpoint(base_path)
    loaded = [load_expert_part(p) for p in parts]
    if not loaded:
        msg = "--parts lists no part: give the folders (or files) the --run.only_task runs wrote"
        raise ValueError(msg)
    checksum = checkpoint.get(DIGEST_KEY) or content_digest(checkpoint)
    config = saved_settings(checkpoint, base_path).config
    settings = checkpoint.get("settings")
    if not isinstance(settings, dict):
        msg = f"base checkpoint '{base_path}' records no run settings (written by an older version); it cannot be merged onto"
        raise CheckpointError(msg)
    for part in loaded:
        if part["base_checksum"] != checksum:
            msg = f"part '{part['path']}' was trained from another base than '{base_path}'"
            raise CheckpointError(msg)
        changed = _differences(settings, part["settings"]) + part["resume_forced"]
        if changed or MoLEFlowConfig.from_saved(part["hyper_parameters"]["config"]) != config:
            what = "; ".join(changed) or "another MoLE-Flow configuration"
            msg = f"part '{part['path']}' was trained with other settings than its base ({what})"
            raise CheckpointError(msg)
        if _data(part["stream"]) != _data(loaded[0]["stream"]):
            msg = f"parts '{loaded[0]['path']}' and '{part['path']}' were trained with other task streams or data settings"
            raise CheckpointError(msg)
    stream_dict = dict(loaded[0]["stream"])
    if num_workers is not None:
        stream_dict["num_workers"] = num_workers
    stream = TaskStream.from_dict(stream_dict)
    done = state.completed_tasks
    mismatch = task_list_mismatch(state.task_names[:done], stream.names[:done])
    if mismatch:
        msg = f"the parts' task stream {stream.names} does not start with the base run's tasks: {mismatch}"
        raise CheckpointError(msg)
    by_task: dict[int, dict[str, Any]] = {}
    for part in loaded:
        if part["task"] in by_task:
            msg = f"parts '{by_task[part['task']]['path']}' and '{part['path']}' both hold task {part['task']}"
            raise ValueError(msg)
        by_task[part["task"]] = part
    missing = [f"{t} '{stream.names[t]}'" for t in range(done, len(stream)) if t not in by_task]
    if missing:
        msg = f"no part holds task(s) {', '.join(missing)} of the stream {stream.names}"
        raise ValueError(msg)
    runner = _MergingRunner(
        config,
        stream,
        trainer=TrainerOptions(**settings["trainer"]),
        run=RunOptions(output_dir=str(output_dir), seed=settings["seed"], use_ogp=checkpoint.get("ogp") is not None),
        parts=by_task,
    )
    target = Path(output_dir) / "checkpoints"
    if not resume or not any(target.glob("task_*.ckpt")):
        _copy_base_checkpoints(base_path, state.completed_tasks, target, state.task_names)
    return runner.run(resume=True)


def _copy_base_checkpoints(base_path: Path, done: int, target: Path, names: Sequence[str]) -> None:
    """Copy the base run's task checkpoints (``base_path`` is its last) into ``target``, which must hold none."""
    if target.is_dir() and any(target.glob("task_*.ckpt")):
        msg = f"'{target.parent}' already holds checkpoints of a run; choose another --output, or pass --resume true"
        raise FileExistsError(msg)
    target.mkdir(parents=True, exist_ok=True)
    for task in range(done):
        name = f"task_{task:02d}_{names[task]}.ckpt"
        source = base_path if task == done - 1 else base_path.parent / name
        if source.is_file():
            with source.open("rb") as src, atomic_open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _data(stream: dict[str, Any]) -> dict[str, Any]:
    """A recorded stream without what does not change results (its ``num_workers``)."""
    return {k: v for k, v in stream.items() if k != "num_workers"}
