"""Crash-safe file writing: a temporary file in the target's folder, flushed, ``fsync``-ed and moved
over the target with :func:`os.replace`, so a run killed mid-write leaves the old file or the new
one, never half a file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "remove_stale_temporaries",
]


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


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (an ``OSError`` names ``path``)."""
    try:
        with atomic_open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (an ``OSError`` names ``path``)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:  # noqa: ANN401 - any JSON value
    """Write ``obj`` as strict JSON (``NaN`` is refused; use ``None``) atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:  # noqa: ANN401 - anything torch.save takes
    """``torch.save(obj, path)`` through a temporary file, flushed, fsync-ed and renamed.

    The bytes are serialised in memory first, so a full disk fails as an ``OSError`` with its
    ``errno`` (``ENOSPC``) and the file name, rather than inside torch's zip writer.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder`` (``.<name>.<random>.tmp``,
    not recursive); returns them. Call it only while no other process writes there."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if path.is_file() and path.name.count(".") >= 3:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
