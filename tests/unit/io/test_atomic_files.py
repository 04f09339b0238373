"""Crash-safe file writing: a run killed mid-write leaves the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalib_moleflow.io import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _failing_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
    """Write part of a checkpoint, then die (disk full, killed, ...)."""
    handle.write(b"PK\x03\x04 half a checkpoint")
    msg = "simulated crash while writing"
    raise RuntimeError(msg)


def test_torch_round_trip_permissions_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "deeper" / "task_00.pt"  # missing parent folders are created
    assert atomic_torch_save({"w": torch.ones(3), "x": [None, 0.5]}, path) == path
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.ones(3)) and loaded["x"] == [None, 0.5]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["task_00.pt"]


def test_overwrite_keeps_the_old_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "private.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"a": 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"weights": torch.zeros(2)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"weights": torch.ones(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_interrupt_inside_atomic_open_cleans_up(tmp_path: Path) -> None:
    """Also a ``BaseException`` (Ctrl-C) removes the temporary file and keeps the target."""
    path = atomic_write_bytes(tmp_path / "data.bin", b"old")
    with pytest.raises(KeyboardInterrupt), atomic_open(path, "wb") as handle:
        handle.write(b"new but unfinished")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_open_text_mode_and_bad_mode(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "t.txt", "w", encoding="utf-8") as handle:
        handle.write("grüße")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "grüße"
    with pytest.raises(ValueError, match="'a'"):
        with atomic_open(tmp_path / "t.txt", "a"):
            pass  # pragma: no cover - never entered
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "grüße"


def test_atomic_text_and_json(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a.txt", "hello")
    assert path.read_text() == "hello"
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(tmp_path / "a.txt", {"x": float("nan")})
    assert path.read_text() == "hello"
    assert json.loads(atomic_write_json(tmp_path / "b.json", {"x": None}).read_text()) == {"x": None}
    assert (tmp_path / "b.json").read_text().endswith("\n")
    assert atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin"]
