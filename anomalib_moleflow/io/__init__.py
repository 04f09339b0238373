"""File writing that survives crashes, and checkpoint reading that refuses code (bottom layer).

Imports only the standard library and torch, so every other layer may use it.
"""

from .atomic_files import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from .safe_load import CheckpointError, safe_torch_load

__all__ = [
    "CheckpointError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "safe_torch_load",
]
