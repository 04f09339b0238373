"""The continual run's console: Lightning's chatter hidden, real warnings kept, loss parts in a CSV."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import TINY_CONFIG, run_python
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core import rank_zero

from anomalib_moleflow.continual.console import (
    LIGHTNING_LOGGERS,
    check_logger_kind,
    quiet_training,
    task_log_dir,
    task_logger,
    tensorboard_available,
)
from anomalib_moleflow.continual.runner import RunOptions
from anomalib_moleflow.data.synthetic import make_stream

TASKS = ["red_stripes", "blue_checker"]
NOISE = (
    "GPU available",
    "TPU available",
    "litlogger",
    "Tip:",
    "eval mode",
    "no logger configured",
    "Seed set to",
    "stepping batches",
    "max_epochs=",
    "Unexpected keys",
    "FutureWarning",
    "LeafSpec",
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_training_drops_lightning_info_lines_only_inside() -> None:
    log = logging.getLogger(rank_zero.log.name)
    assert log.name in LIGHTNING_LOGGERS
    records = _Records()
    log.addHandler(records)
    try:
        with quiet_training():
            rank_zero_info("GPU available: False, used: False")
            rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
            rank_zero_info("Restoring states from the checkpoint")  # not noise: kept
        rank_zero_info("GPU available: False, used: False")  # outside the block: shown again
    finally:
        log.removeHandler(records)
    assert records.messages == ["Restoring states from the checkpoint", "GPU available: False, used: False"]


def test_quiet_training_hides_timm_head_note_but_not_missing_keys() -> None:
    log = logging.getLogger("timm.models._builder")
    records = _Records()
    log.addHandler(records)
    try:
        with quiet_training():
            log.warning("Unexpected keys (classifier.weight) found while loading pretrained weights.")
            log.warning("Missing keys (blocks.0.weight) discovered while loading pretrained weights.")
    finally:
        log.removeHandler(records)
    assert records.messages == ["Missing keys (blocks.0.weight) discovered while loading pretrained weights."]


def test_quiet_training_keeps_real_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_training():
            warnings.warn("Found 265 module(s) in eval mode at the start of training. This may ...", stacklevel=1)
            warnings.warn("You called `self.log('train_loss', ..., logger=True)` but have no logger configured.", stacklevel=1)
            warnings.warn("The learning rate is too high", UserWarning, stacklevel=1)
        warnings.warn("Found 3 module(s) in eval mode at the start of training.", stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "The learning rate is too high",
        "Found 3 module(s) in eval mode at the start of training.",
    ]


def test_task_logger_writes_into_the_task_folder_and_clears_an_old_one(tmp_path: Path) -> None:
    folder = task_log_dir(tmp_path, 1, "cable")
    assert folder == tmp_path / "logs" / "task_01_cable"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,train_loss_epoch\n0,9.9\n")
    loggers = task_logger(tmp_path, 1, "cable")
    assert isinstance(loggers, list) and len(loggers) == 1 and isinstance(loggers[0], CSVLogger)
    assert Path(loggers[0].log_dir) == folder
    assert not folder.exists()  # the dropped training's curves are gone
    assert task_logger(tmp_path, 1, "cable", "none") is False


def test_logger_kind_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="run.logger must be one of csv, tensorboard, none, got 'wandb'"):
        check_logger_kind("wandb")
    if not tensorboard_available():
        with pytest.raises(ValueError, match=r"pip install tensorboard"):
            check_logger_kind("tensorboard")
    assert RunOptions().logger == "csv"


def test_tensorboard_logger(tmp_path: Path) -> None:
    """TensorBoard is in the ``test`` extra, so this path runs wherever the tests do."""
    assert tensorboard_available()
    loggers = task_logger(tmp_path, 0, "bottle", "tensorboard")
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger"]


def test_run_console_and_loss_csv(tmp_path: Path) -> None:
    """A two-task run through the command: each task's metrics.csv holds its per-epoch loss parts,
    and the console shows the task bar and the summary without Lightning's tips."""
    data_root = make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    output_dir = tmp_path / "run"
    config = {
        "model": {"config": TINY_CONFIG},
        "data": {"root": str(data_root), "tasks": TASKS, "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0},
        "trainer": {"max_epochs": 2, "limit_train_batches": 1},
        "run": {"output_dir": str(output_dir)},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    done = run_python(["-m", "anomalib_moleflow", "continual", "--config", str(config_path)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert [text for text in NOISE if text in console] == []
    assert "continual:" in done.stderr and "2/2" in done.stderr  # the bar over the tasks
    assert f"results written to {output_dir}" in done.stdout
    for task, name in enumerate(TASKS):
        with (output_dir / "logs" / f"task_{task:02d}_{name}" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [row["epoch"] for row in rows] == ["0", "1"]
        for column in ("train_loss_epoch", "train_nll", "train_tail", "train_logdet_reg"):
            assert all(float(row[column]) == float(row[column]) for row in rows), column  # present, not NaN
