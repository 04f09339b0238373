"""The checkpoint a continual run writes after each task: run state, format marker, checked loading."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_moleflow.continual.run_checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    RunState,
    extended_results,
    latest_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
    task_list_mismatch,
)
from anomalib_moleflow.io import CheckpointError, safe_torch_load


def _failing_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
    """Write part of a checkpoint, then die (disk full, killed, ...)."""
    handle.write(b"PK\x03\x04 half a checkpoint")
    msg = "simulated crash while writing"
    raise RuntimeError(msg)


def test_format_constants() -> None:
    assert FORMAT_KEY == "anomalib_moleflow_continual"
    assert FORMAT_VERSION == 2 and READABLE_VERSIONS == (1, 2)


def test_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "task_00.pt"
    state = RunState(["a", "b"], completed_tasks=1)
    save_run_checkpoint(path, state, {"model": {"w": torch.ones(3)}, "results": {"x": [None, 0.5]}})
    checkpoint, loaded = load_run_checkpoint(path, expected_tasks=["a", "b"])
    assert loaded == state and checkpoint[FORMAT_KEY] == FORMAT_VERSION
    assert checkpoint["run_state"] == {"task_names": ["a", "b"], "completed_tasks": 1, "complete": False}
    assert torch.equal(checkpoint["model"]["w"], torch.ones(3))
    assert checkpoint["results"] == {"x": [None, 0.5]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["task_00.pt"]


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
    checkpoint, loaded = load_run_checkpoint(path)
    assert loaded.completed_tasks == 1 and not loaded.complete and loaded.next_task == 1
    assert torch.equal(checkpoint["weights"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_and_corrupt_files_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_run_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "task_01_transistor.pt"
    save_run_checkpoint(path, RunState(["a"], 1), {"weights": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"task_01_transistor\.pt.*truncated or corrupt"):
        load_run_checkpoint(path)


def test_not_our_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*no 'anomalib_moleflow_continual' marker"):
        load_run_checkpoint(foreign)
    assert safe_torch_load(foreign) == {"state_dict": {}}  # the plain loader still reads it
    newer = tmp_path / "newer.pt"
    torch.save({FORMAT_KEY: 99}, newer)
    with pytest.raises(CheckpointError, match=r"newer\.pt.*format version 99.*reads versions 1, 2"):
        load_run_checkpoint(newer)
    pickled = tmp_path / "pickled.pt"
    torch.save({FORMAT_KEY: 1, "obj": RunState(["a"])}, pickled)  # arbitrary objects: refused by weights_only
    with pytest.raises(CheckpointError, match=r"pickled\.pt"):
        load_run_checkpoint(pickled)


def test_format_1_still_loads(tmp_path: Path) -> None:
    """Format 1 kept the model config, state dict and task keys at the top level."""
    old = tmp_path / "task_00_bottle.ckpt"
    torch.save(
        {
            FORMAT_KEY: 1,
            "run_state": {"task_names": ["bottle", "cable"], "completed_tasks": 1, "complete": False},
            "model_config": {"lora_rank": 2},
            "state_dict": {"w": torch.ones(1)},
            "task_keys": ["0"],
        },
        old,
    )
    checkpoint, state = load_run_checkpoint(old, expected_tasks=["bottle", "cable"])
    assert checkpoint[FORMAT_KEY] == 1 and checkpoint["task_keys"] == ["0"]
    assert state == RunState(["bottle", "cable"], completed_tasks=1)


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
    with pytest.raises(ValueError, match=r"completed_tasks=3 is outside \[0, 2\]"):
        RunState(["a", "b"], completed_tasks=3)
    assert RunState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert RunState([0, 1]).task_names == ["0", "1"]  # names are strings
    state.mark_task_done(1)
    assert state.next_task is None
    state.mark_complete()
    assert state.complete

    # A hand-edited or foreign "complete" marker on an unfinished run is refused.
    bad = tmp_path / "bad.pt"
    torch.save({FORMAT_KEY: 1, "run_state": {"task_names": ["a", "b"], "completed_tasks": 1, "complete": True}}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*inconsistent 'run_state'"):
        load_run_checkpoint(bad)
    no_state = tmp_path / "no_state.pt"
    torch.save({FORMAT_KEY: 1}, no_state)
    with pytest.raises(CheckpointError, match=r"no_state\.pt.*missing or inconsistent 'run_state'"):
        load_run_checkpoint(no_state)
    good = tmp_path / "good.pt"
    save_run_checkpoint(good, RunState(["a", "b"], 1), {})
    with pytest.raises(CheckpointError, match=r"good\.pt.*over the tasks \['a', 'b'\].*\['a', 'c'\]"):
        load_run_checkpoint(good, expected_tasks=["a", "c"])
    with pytest.raises(ValueError, match="reserved"):
        save_run_checkpoint(good, state, {"run_state": {}})
    with pytest.raises(ValueError, match="reserved"):
        save_run_checkpoint(good, state, {FORMAT_KEY: 1})
    assert load_run_checkpoint(good)[1].completed_tasks == 1  # the refused saves wrote nothing


def test_task_list_mismatch_names_the_first_difference() -> None:
    assert task_list_mismatch(["a", "b"], ["a", "b"]) is None
    assert task_list_mismatch(["a", "b"], ["a", "b", "c"], allow_more_tasks=True) is None
    assert task_list_mismatch(["a", "b"], ["a", "b", "c"]) == "the stream adds task 2 'c'"
    assert task_list_mismatch(["a", "b"], ["a", "x", "c"], allow_more_tasks=True) == "task 1 is 'b' in the run but 'x' in the stream"
    assert task_list_mismatch(["a", "b"], ["a"], allow_more_tasks=True) == "the stream ends before the run's task 1 'b'"


def test_a_longer_stream_loads_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "task_01_b.ckpt"
    save_run_checkpoint(path, RunState(["a", "b"], 2, complete=True), {})
    _, state = load_run_checkpoint(path, expected_tasks=["a", "b", "c"], allow_more_tasks=True)
    grown = state.extended(["a", "b", "c"])
    assert (grown.task_names, grown.completed_tasks, grown.complete, grown.next_task) == (["a", "b", "c"], 2, False, 2)
    assert state.extended(["a", "b"]).complete  # nothing added: still complete
    with pytest.raises(CheckpointError, match=r"task_01_b\.ckpt.*the stream adds task 2 'c'"):
        load_run_checkpoint(path, expected_tasks=["a", "b", "c"])
    with pytest.raises(CheckpointError, match=r"task 0 is 'a' in the run but 'c'.*new tasks may follow them"):
        load_run_checkpoint(path, expected_tasks=["c", "a", "b"], allow_more_tasks=True)
    with pytest.raises(ValueError, match="ends before the run's task 1 'b'"):
        state.extended(["a"])


def test_extended_results_pads_every_matrix() -> None:
    results = {
        "tasks": ["a"],
        "matrix": {"image_AUROC": [[0.5]]},
        "matrix_oracle": {"image_AUROC": [[0.75]]},
        "timing": {"train_seconds": {"a": 1.0}},
    }
    grown = extended_results(results, ["a", "b", "c"])
    assert grown["tasks"] == ["a", "b", "c"]
    assert grown["matrix"]["image_AUROC"] == [[0.5, None, None], [None, None, None], [None, None, None]]
    assert grown["matrix_oracle"]["image_AUROC"][0] == [0.75, None, None]
    assert grown["timing"] == results["timing"] and results["tasks"] == ["a"]  # the input is not changed
    with pytest.raises(ValueError, match="task 0 is 'a' in the run but 'b'"):
        extended_results(results, ["b"])


def test_latest_checkpoint_takes_the_highest_task_index(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("task_99_i.ckpt", "task_100_j.ckpt", "task_02_c.ckpt"):
        (folder / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path / "run") == folder / "task_100_j.ckpt"  # not the last name in sorted order
    assert latest_checkpoint(folder / "task_02_c.ckpt") == folder / "task_02_c.ckpt"
    with pytest.raises(FileNotFoundError, match="neither a run folder nor a checkpoint"):
        latest_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"'.*empty' holds no task checkpoint"):
        latest_checkpoint((tmp_path / "empty").mkdir() or tmp_path / "empty")
