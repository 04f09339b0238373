"""One writer per run folder."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from anomalib_moleflow.continual.run_lock import LOCK_NAME, RunLock, RunLockedError


def test_lock_names_its_owner_and_is_released(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert lock.path.exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 777, "host": socket.gethostname(), "since": "then"}))
    with pytest.warns(UserWarning, match="stale lock"), RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_of_another_host_is_respected(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunLockedError, match="host elsewhere"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).release()  # not ours: left in place
    assert (tmp_path / LOCK_NAME).exists()
