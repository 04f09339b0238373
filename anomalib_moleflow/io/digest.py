"""A checksum of a checkpoint's content: every tensor's dtype, shape and bytes and every plain value,
in key order, so one flipped byte anywhere is found."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

DIGEST_KEY = "checksum"


def _update(h: Any, value: Any) -> None:  # noqa: ANN401 - a hashlib object, any checkpoint value
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(json.dumps(str(key)).encode())
            _update(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _update(h, item)
        h.update(b"]")
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())


def content_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of everything in ``checkpoint`` except its :data:`DIGEST_KEY` entry."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in checkpoint.items() if k != DIGEST_KEY})
    return h.hexdigest()
