"""Continual (task-after-task) training support for MoLE-Flow."""

from .checkpoint_io import (
    FORMAT_KEY,
    FORMAT_VERSION,
    CheckpointError,
    RunState,
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_run_checkpoint,
    safe_torch_load,
    save_run_checkpoint,
)
from .metrics import METRIC_NAMES, ContinualResults
from .routers import UNKNOWN, PrototypeRouter, TwoStageHybridRouter, pool_features
from .task_stream import MVTEC_ALPHABETICAL_ORDER, MVTEC_ORIGINAL_ORDER, TaskSpec, TaskStream

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "METRIC_NAMES",
    "MVTEC_ALPHABETICAL_ORDER",
    "MVTEC_ORIGINAL_ORDER",
    "UNKNOWN",
    "CheckpointError",
    "ContinualResults",
    "PrototypeRouter",
    "RunState",
    "TaskSpec",
    "TaskStream",
    "TwoStageHybridRouter",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_run_checkpoint",
    "pool_features",
    "safe_torch_load",
    "save_run_checkpoint",
]
