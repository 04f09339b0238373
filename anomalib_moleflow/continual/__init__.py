"""Continual (task-after-task) training of MoLE-Flow: the task stream, the runner, the evaluation
and its result tables, and the run checkpoints."""

from .results_tables import METRIC_NAMES, ContinualResults
from .run_checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    RunState,
    load_run_checkpoint,
    save_run_checkpoint,
)
from .runner import ContinualRunner, RunOptions, TrainerOptions, build_model
from .task_stream import (
    MVTEC_ALPHABETICAL_ORDER,
    MVTEC_ORIGINAL_ORDER,
    TaskSpec,
    TaskStream,
)

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "METRIC_NAMES",
    "MVTEC_ALPHABETICAL_ORDER",
    "MVTEC_ORIGINAL_ORDER",
    "ContinualResults",
    "ContinualRunner",
    "RunOptions",
    "RunState",
    "TaskSpec",
    "TaskStream",
    "TrainerOptions",
    "build_model",
    "load_run_checkpoint",
    "save_run_checkpoint",
]
