"""Checkpoint reading with ``weights_only=True``: plain data and tensors, never code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .digest import DIGEST_KEY, content_digest

__all__ = ["CheckpointError", "safe_torch_load", "verify_digest"]


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, inconsistent or not one of ours; names the file."""


def safe_torch_load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder).
        CheckpointError: the file is truncated, corrupt, holds objects that ``weights_only``
            loading refuses, or is not a dict.
    """
    path = Path(path)
    if not path.exists():
        msg = f"Checkpoint file '{path}' does not exist."
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"Checkpoint path '{path}' is not a file."
        raise FileNotFoundError(msg)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        size = path.stat().st_size
        msg = (
            f"Cannot load checkpoint '{path}' ({size} bytes): {type(exc).__name__}: {_first_sentence(exc)} "
            "The file is truncated or corrupt (e.g. the run was killed while writing it, or the disk is full), "
            "or it is not a torch checkpoint saved by anomalib_moleflow. Delete it to restart from the "
            "previous checkpoint."
        )
        raise CheckpointError(msg) from exc
    if not isinstance(obj, dict):
        msg = f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict."
        raise CheckpointError(msg)
    return obj


def verify_digest(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when ``checkpoint`` carries a checksum that its
    content no longer matches (a changed byte: bit rot, a copy gone wrong, or tampering)."""
    expected = checkpoint.get(DIGEST_KEY)
    if expected is None:
        return
    if content_digest(checkpoint) != expected:
        msg = (
            f"Checkpoint '{path}' fails its checksum: its content changed after it was written (bit rot, an "
            "incomplete copy, or tampering). Restore it from a copy, or delete it to resume from the checkpoint before."
        )
        raise CheckpointError(msg)


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an error message (torch's loader errors run on for a paragraph)."""
    text = " ".join(str(exc).split())
    end = text.find(". ")
    first = (text[: end + 1] if end >= 0 else text)[:300]
    refused = re.search(r"Unsupported global: GLOBAL [\w.]+", text)  # what weights_only refused to unpickle
    return f"{first} ({refused.group(0)})" if refused else first
