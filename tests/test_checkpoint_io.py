"""Tests of crash-safe writing and checked loading of continual checkpoints."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_moleflow.continual import (
    FORMAT_KEY,
    CheckpointError,
    RunState,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_run_checkpoint,
    safe_torch_load,
    save_run_checkpoint,
)


def _failing_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
    """Write part of a checkpoint, then die (disk full, killed, ...)."""
    handle.write(b"PK\x03\x04 half a checkpoint")
    msg = "simulated crash while writing"
    raise RuntimeError(msg)


def test_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "task_00.pt"
    state = RunState(["a", "b"], completed_tasks=1)
    save_run_checkpoint(path, state, {"model": {"w": torch.ones(3)}, "results": {"x": [None, 0.5]}})
    checkpoint, loaded = load_run_checkpoint(path, expected_tasks=["a", "b"])
    assert loaded == state and checkpoint[FORMAT_KEY] == 1
    assert torch.equal(checkpoint["model"]["w"], torch.ones(3))
    assert checkpoint["results"] == {"x": [None, 0.5]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["task_00.pt"]


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"a": 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped run never leaves a checkpoint that loads as further along (or complete)."""
    path = tmp_path / "last.pt"
    state = RunState(["a", "b"])
    state.mark_task_done(0)
    save_run_checkpoint(path, state, {"weights": torch.zeros(2)})
    state.mark_task_done(1)
    state.mark_complete()
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError):
        save_run_checkpoint(path, state, {"weights": torch.ones(2)})
    monkeypatch.undo()
    _, loaded = load_run_checkpoint(path)
    assert loaded.completed_tasks == 1 and not loaded.complete and loaded.next_task == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        safe_torch_load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="not a file"):
        safe_torch_load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "task_01_transistor.pt"
    save_run_checkpoint(path, RunState(["a"], 1), {"weights": torch.randn(1000)})
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10, "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match=r"task_01_transistor\.pt.*truncated or corrupt"):
        safe_torch_load(path)


def test_not_our_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*no 'anomalib_moleflow_continual' marker"):
        safe_torch_load(foreign)
    assert safe_torch_load(foreign, require_format=False) == {"state_dict": {}}
    newer = tmp_path / "newer.pt"
    torch.save({FORMAT_KEY: 99}, newer)
    with pytest.raises(CheckpointError, match="format version 99"):
        safe_torch_load(newer)
    pickled = tmp_path / "pickled.pt"
    torch.save({FORMAT_KEY: 1, "obj": RunState(["a"])}, pickled)  # arbitrary objects: refused by weights_only
    with pytest.raises(CheckpointError, match=r"pickled\.pt"):
        safe_torch_load(pickled)


def test_run_state_rules(tmp_path: Path) -> None:
    state = RunState(["a", "b"])
    assert state.next_task == 0
    with pytest.raises(ValueError, match="next unfinished task is 0"):
        state.mark_task_done(1)
    state.mark_task_done(0)
    with pytest.raises(ValueError, match="1 of 2 tasks done"):
        state.mark_complete()
    with pytest.raises(ValueError, match="marked complete after only 1 of 2"):
        RunState(["a", "b"], completed_tasks=1, complete=True)
    assert RunState.from_dict(json.loads(json.dumps(state.to_dict()))) == state

    # A hand-edited or foreign "complete" marker on an unfinished run is refused.
    bad = tmp_path / "bad.pt"
    torch.save({FORMAT_KEY: 1, "run_state": {"task_names": ["a", "b"], "completed_tasks": 1, "complete": True}}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*inconsistent 'run_state'"):
        load_run_checkpoint(bad)
    good = tmp_path / "good.pt"
    save_run_checkpoint(good, state, {})
    with pytest.raises(CheckpointError, match=r"over the tasks \['a', 'b'\].*\['a', 'c'\]"):
        load_run_checkpoint(good, expected_tasks=["a", "c"])
    with pytest.raises(ValueError, match="reserved"):
        save_run_checkpoint(good, state, {"run_state": {}})


def test_atomic_text_and_json(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a.txt", "hello")
    assert path.read_text() == "hello"
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(tmp_path / "a.txt", {"x": float("nan")})
    assert path.read_text() == "hello"
    assert json.loads(atomic_write_json(tmp_path / "b.json", {"x": None}).read_text()) == {"x": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]
