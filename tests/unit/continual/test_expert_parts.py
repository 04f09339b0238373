"""Expert part files and the checks a part run makes before it trains (the training itself:
``tests/integration/test_grow_and_merge.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_moleflow.continual import ContinualRunner, RunOptions, TaskStream
from anomalib_moleflow.continual.expert_parts import (
    PART_KEY,
    PART_VERSION,
    check_independent_experts,
    load_expert_part,
    part_path,
    train_expert_part,
)
from anomalib_moleflow.io import DIGEST_KEY, CheckpointError, content_digest
from anomalib_moleflow.models.moleflow import MoLEFlowConfig


def _write_part(path: Path, **values: object) -> Path:
    part = {PART_KEY: PART_VERSION, "task": 1, "state_dict": {"model.w": torch.ones(2)}, "base_checksum": "b", **values}
    part[DIGEST_KEY] = content_digest(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(part, path)
    return path


def test_part_file_round_trip_and_refusals(tmp_path: Path) -> None:
    path = _write_part(part_path(tmp_path / "part_1", 1, "cable"))
    assert path.name == "expert_01_cable.ckpt"
    for source in (path, path.parent):  # the file, or the folder that holds it
        part = load_expert_part(source)
        assert part["task"] == 1 and part["path"] == str(path) and torch.equal(part["state_dict"]["model.w"], torch.ones(2))
    _write_part(tmp_path / "two" / "expert_01_a.ckpt")
    _write_part(tmp_path / "two" / "expert_02_b.ckpt")
    with pytest.raises(FileNotFoundError, match=r"'.*two' holds 2 expert files"):
        load_expert_part(tmp_path / "two")
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*none' holds 0 expert files"):
        load_expert_part(tmp_path / "none")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match=r"other\.ckpt' is not an expert part file"):
        load_expert_part(other)
    changed = torch.load(path, weights_only=True)
    changed["task"] = 2
    torch.save(changed, path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_expert_part(path)


def test_independent_experts_need_frozen_shared_parts() -> None:
    check_independent_experts(MoLEFlowConfig())  # V4.1: nothing shared trains after task 0
    thawed = MoLEFlowConfig().updated({"flow.freeze_mixer_after_task0": False})
    with pytest.raises(ValueError, match=r"model\.config\.flow\.freeze_mixer_after_task0 is false"):
        check_independent_experts(thawed)


@pytest.mark.parametrize(
    ("run", "config", "error", "match"),
    [
        ({"only_task": 1}, {}, ValueError, "run.only_task and run.base go together"),
        ({"only_task": 0, "base": "b"}, {}, ValueError, r"run.only_task=0 is outside \[1, 2\] for the 3 tasks"),
        ({"only_task": 3, "base": "b"}, {}, ValueError, "run.only_task=3 is outside"),
        ({"only_task": 1, "base": "b"}, {"flow.freeze_base_after_task0": False}, ValueError, "freeze_base_after_task0 is false"),
        ({"only_task": 1, "base": "no_such_run"}, {}, FileNotFoundError, "'no_such_run' is neither a run folder"),
    ],
)
def test_part_run_refuses_before_training(
    tmp_path: Path, run: dict, config: dict, error: type[Exception], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    stream = TaskStream(["a", "b", "c"], root=str(tmp_path / "data"))
    runner = ContinualRunner(MoLEFlowConfig().updated(config), stream, run=RunOptions(output_dir=str(tmp_path / "out"), **run))
    with pytest.raises(error, match=match):
        train_expert_part(runner)
    assert not (tmp_path / "out").exists()
