"""Checkpoint reading with ``weights_only=True``: plain data and tensors, never code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "safe_torch_load"]


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
            f"Cannot load checkpoint '{path}' ({size} bytes): {type(exc).__name__}: {str(exc).strip()[:300]}. "
            "The file is truncated or corrupt (e.g. the run was killed while writing it, or the disk is full), "
            "or it is not a torch checkpoint saved by anomalib_moleflow. Delete it to restart from the "
            "previous checkpoint."
        )
        raise CheckpointError(msg) from exc
    if not isinstance(obj, dict):
        msg = f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict."
        raise CheckpointError(msg)
    return obj
