"""File writing that survives crashes, and checkpoint reading that refuses code (bottom layer).

Imports only the standard library and torch, so every other layer may use it.
"""

from .atomic_files import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
)
from .digest import DIGEST_KEY, content_digest
from .safe_load import CheckpointError, safe_torch_load, verify_digest

__all__ = [
    "DIGEST_KEY",
    "CheckpointError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "content_digest",
    "remove_stale_temporaries",
    "safe_torch_load",
    "verify_digest",
]
