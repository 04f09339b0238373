"""What ``merge_parts`` refuses before it loads any model: parts of another base, other settings,
a task missing or held twice (a merge that works: ``tests/integration/test_grow_and_merge.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_moleflow.continual.expert_parts import PART_KEY, PART_VERSION, part_path
from anomalib_moleflow.continual.merge import merge_parts
from anomalib_moleflow.continual.run_checkpoint import RunState, save_run_checkpoint
from anomalib_moleflow.io import DIGEST_KEY, CheckpointError, content_digest, safe_torch_load
from anomalib_moleflow.models.moleflow import MoLEFlowConfig

TASKS = ["a", "b", "c"]
STREAM = {"tasks": [{"name": t, "kind": "mvtec", "category": t} for t in TASKS], "root": "data", "train_batch_size": 4,
          "eval_batch_size": 4, "num_workers": 0, "seed": None}  # fmt: skip
SETTINGS = {"seed": 0, "trainer": {"max_epochs": 1, "later_task_epochs": None, "limit_train_batches": 1.0, "deterministic": False},
            "data": {"root": "data", "train_batch_size": 4, "eval_batch_size": 4, "seed": None}}  # fmt: skip


@pytest.fixture
def base(tmp_path: Path) -> Path:
    payload = {"state_dict": {}, "hyper_parameters": {"config": MoLEFlowConfig().to_dict(), "normalize_scores": True},
               "settings": SETTINGS, "stream": {**STREAM, "tasks": STREAM["tasks"][:1]}, "results": {}, "ogp": None}  # fmt: skip
    path = tmp_path / "base" / "checkpoints" / "task_00_a.ckpt"
    save_run_checkpoint(path, RunState(["a"], 1, complete=True), payload)
    return tmp_path / "base"


def _part(folder: Path, task: int, base: Path | None, **changes: Any) -> Path:  # noqa: ANN401
    checksum = safe_torch_load(base / "checkpoints" / "task_00_a.ckpt")[DIGEST_KEY] if base else "another"
    part = {PART_KEY: PART_VERSION, "task": task, "state_dict": {}, "base_checksum": checksum, "stream": STREAM,
            "settings": SETTINGS, "hyper_parameters": {"config": MoLEFlowConfig().to_dict()}, "train_seconds": 1.0,
            "resume_forced": [], **changes}  # fmt: skip
    part[DIGEST_KEY] = content_digest(part)
    path = part_path(folder, task, TASKS[task])
    path.parent.mkdir(parents=True)
    torch.save(part, path)
    return folder


@pytest.mark.parametrize(
    ("parts", "error", "match"),
    [
        ([(1, True, {}), (2, False, {})], CheckpointError, r"part_2_again/expert_02_c\.ckpt' was trained from another base than '.*task_00_a\.ckpt'"),
        ([(1, True, {}), (2, True, {"settings": {**SETTINGS, "seed": 3}})], CheckpointError, r"other settings than its base \(seed: 0 -> 3\)"),
        ([(1, True, {}), (2, True, {"stream": {**STREAM, "root": "elsewhere"}})], CheckpointError, "other task streams or data settings"),
        ([(1, True, {})], ValueError, "no part holds task\\(s\\) 2 'c' of the stream \\['a', 'b', 'c'\\]"),
        ([(1, True, {}), (1, True, {})], ValueError, r"both hold task 1"),
        ([(1, True, {"stream": {**STREAM, "tasks": STREAM["tasks"][::-1]}})], CheckpointError, "does not start with the base run's tasks: task 0 is 'a'"),
    ],
)
def test_merge_refusals(base: Path, tmp_path: Path, parts: list, error: type[Exception], match: str) -> None:
    folders = [_part(tmp_path / f"part_{task}{'_again' * i}", task, base if ours else None, **changes)
               for i, (task, ours, changes) in enumerate(parts)]  # fmt: skip
    with pytest.raises(error, match=match):
        merge_parts(base, folders, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_needs_parts(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--parts lists no part"):
        merge_parts(base, [], tmp_path / "merged")
