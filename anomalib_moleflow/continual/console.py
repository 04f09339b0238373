"""A readable console for continual runs: Lightning's chatter off, loss parts in a real logger.

:func:`quiet_training` drops the lines Lightning prints for every new ``Trainer`` that say nothing
about the run (device inventory, the cloud-logger tip, eval-mode modules, "no logger configured",
"max_epochs reached", ...) and timm's note on the classifier weights a feature backbone does not
use; every other warning still shows. :func:`task_logger` gives the Lightning
logger of one task, under ``<run>/logs/task_<t>_<name>/``: ``metrics.csv`` with the per-epoch
loss parts (``train_loss_epoch``, ``train_nll``, ...) and, with the subnets' context branch, its
strength per coupling block (``context_alpha/block_<i>`` and ``alpha_mean`` for the global alpha;
``gate_{mean,std,min,max}/block_<i>`` and ``gate_mean`` ... ``gate_max`` for the patch-wise gate),
and TensorBoard event files as well with ``run.logger=tensorboard``.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning_utilities.core import rank_zero
from lightning_utilities.core.imports import RequirementCache

LoggerKind = Literal["csv", "tensorboard", "none"]
LOGGER_KINDS: tuple[str, ...] = ("csv", "tensorboard", "none")

#: Lightning info lines (``rank_zero_info`` / seed logger) that say nothing about the run.
NOISE_INFO: tuple[str, ...] = (
    r"(GPU|TPU|HPU|IPU) available: ",
    r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
    r".*Tip: For seamless cloud logging",
    r"`Trainer\(limit_\w+_batches=.*\)` was configured so",
    r"Loading `\w+_dataloader` to estimate number of stepping batches",
    r"`Trainer.fit` stopped: `max_epochs=\d+` reached",
    r"Seed set to ",
)
#: Lightning warnings that do not apply to these runs (message patterns, matched at the start).
NOISE_WARNINGS: tuple[str, ...] = (
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen backbone, on purpose
    r"You called `self.log\(.*\)` but have no logger configured",  # run.logger=none
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # loss parts are per epoch
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning internals vs. newer torch
    r"GPU available but not used",
)
#: timm's note when a feature-only backbone loads full ImageNet weights (their classifier head is unused).
NOISE_TIMM = r"Unexpected keys \(.*\) found while loading pretrained weights"
#: The loggers those info lines come from.
LIGHTNING_LOGGERS: tuple[str, ...] = tuple(
    f"{package}.utilities.{module}"
    for package in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
    for module in ("rank_zero", "seed")
)


class _DropNoise(logging.Filter):
    """Drops log records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


@contextmanager
def quiet_training() -> Iterator[None]:
    """Hide :data:`NOISE_INFO`, :data:`NOISE_WARNINGS` and :data:`NOISE_TIMM` inside the block."""
    # rank_zero_info logs to the logger of whichever Lightning package was imported last
    names = {*LIGHTNING_LOGGERS, rank_zero.log.name}
    filters = [(logging.getLogger(name), _DropNoise(NOISE_INFO)) for name in sorted(names)]
    filters.append((logging.getLogger("timm.models._builder"), _DropNoise((NOISE_TIMM,))))
    for log, noise in filters:
        log.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for message in NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for log, noise in filters:
            log.removeFilter(noise)


def tensorboard_available() -> bool:
    """``tensorboard`` or ``tensorboardX`` is installed (Lightning's TensorBoard logger needs one)."""
    return bool(RequirementCache("tensorboard")) or bool(RequirementCache("tensorboardX"))


def check_logger_kind(kind: str) -> None:
    """Raise ``ValueError`` (one line) for an unknown ``run.logger`` or a TensorBoard that is not installed."""
    if kind not in LOGGER_KINDS:
        msg = f"run.logger must be one of {', '.join(LOGGER_KINDS)}, got {kind!r}"
        raise ValueError(msg)
    if kind == "tensorboard" and not tensorboard_available():
        msg = "run.logger=tensorboard needs the tensorboard package (pip install tensorboard); or use run.logger=csv"
        raise ValueError(msg)


def task_log_dir(output_dir: Path, task: int, name: str) -> Path:
    """Folder of task ``task``'s training logs: ``<run>/logs/task_<tt>_<name>``."""
    return Path(output_dir) / "logs" / f"task_{task:02d}_{name}"


def task_logger(output_dir: Path, task: int, name: str, kind: str = "csv") -> list[Logger] | bool:
    """Lightning logger(s) for training task ``task`` (``False`` for ``kind="none"``).

    The task's log folder is emptied first: a task is only trained again when its earlier
    training was dropped (a stopped run resumed), and its old curves would mislead.
    """
    check_logger_kind(kind)
    if kind == "none":
        return False
    folder = task_log_dir(output_dir, task, name)
    if folder.exists():
        shutil.rmtree(folder)
    save_dir, sub = str(folder.parent), folder.name
    loggers: list[Logger] = [CSVLogger(save_dir=save_dir, name=sub, version="")]
    if kind == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=save_dir, name=sub, version="", default_hp_metric=False))
    return loggers


__all__ = [
    "LOGGER_KINDS",
    "LoggerKind",
    "check_logger_kind",
    "quiet_training",
    "task_log_dir",
    "task_logger",
    "tensorboard_available",
]
