"""One writer per run folder: a lock file that names its owner (pid, host), taken over when stale."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".moleflow_run.lock"


class RunLockedError(FileExistsError):
    """Another live run writes to the same run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(folder):`` holds ``folder/.moleflow_run.lock`` for the block.

    A lock whose owner runs on this host but no longer exists is stale: it is taken over with a
    warning. A lock of a live process, or of another host (whose processes cannot be checked),
    refuses the run with a message naming the owner.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.owner, handle)
        return True

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._try_create():
            return
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            other = {}
        pid, host = other.get("pid"), other.get("host")
        if isinstance(pid, int) and host == self.owner["host"] and not _alive(pid):
            warnings.warn(f"taking over the stale lock '{self.path}' of pid {pid} (no longer running)", stacklevel=2)
            self.path.unlink(missing_ok=True)
            if self._try_create():
                return
            other = {}
        msg = (
            f"'{self.path.parent}' is in use by another run (pid {pid} on host {host} since {other.get('since')}, "
            f"lock file '{self.path}'); wait for it to finish or choose another run.output_dir"
        )
        raise RunLockedError(msg)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
