"""The context branch's strength in the training log: the subnets' getters (Baseline 1.5's alpha,
Baseline 2.0's gate statistics, recorded in training only), the model's per-block summary, and the
per-epoch columns a task's ``metrics.csv`` gets from a real fit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from helpers import tiny_config

from anomalib_moleflow import MoLEFlow
from anomalib_moleflow.continual.console import task_log_dir, task_logger
from anomalib_moleflow.data import MVTecADLocal
from anomalib_moleflow.models.moleflow import MoLEFlowModel

GATE = {"flow.use_context": True, "flow.use_context_gate": True}
ALPHA = {"flow.use_context": True, "flow.use_context_gate": False}
NO_CONTEXT = {"flow.use_context": False}


def _model(**overrides: object) -> MoLEFlowModel:
    torch.manual_seed(0)
    model = MoLEFlowModel(tiny_config(**overrides))
    model.add_task()
    return model


def test_alpha_per_block_is_the_bounded_global_alpha() -> None:
    model = _model(**ALPHA)
    subnets = model.flow.subnets()
    with torch.no_grad():
        subnets[1].context_scale_param.fill_(3.0)
    stats = model.context_statistics()
    expected = [0.1, 0.2 * torch.sigmoid(torch.tensor(3.0)).item()]  # init scale 0.1, max alpha 0.2
    assert stats["context_alpha/block_0"] == pytest.approx(expected[0], rel=1e-5)
    assert stats["context_alpha/block_1"] == pytest.approx(expected[1], rel=1e-5)
    assert stats["alpha_mean"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert subnets[0].get_last_gate_stats() is None and not any(k.startswith("gate") for k in stats)


def test_gate_statistics_come_from_the_last_training_forward_only(tiny_features: torch.Tensor) -> None:
    model = _model(**GATE)
    subnets = model.flow.subnets()
    assert model.context_statistics() == {}  # no forward yet
    assert all(s.get_context_alpha() is None for s in subnets)
    model.train()
    model.flow_forward(tiny_features)
    stats = model.context_statistics()
    for index in range(2):  # zero-initialised gate nets: every patch's gate is exactly 0.5
        assert stats[f"gate_mean/block_{index}"] == pytest.approx(0.5)
        assert stats[f"gate_std/block_{index}"] == pytest.approx(0.0, abs=1e-7)
        assert stats[f"gate_min/block_{index}"] == stats[f"gate_max/block_{index}"] == pytest.approx(0.5)

    with torch.no_grad():  # a gate that varies over the patches
        subnets[0].context_gate_net[0].weight.normal_(0.0, 0.5)
        subnets[0].context_gate_net[2].weight.normal_(0.0, 0.5)
    model.flow_forward(tiny_features)
    first = subnets[0].get_last_gate_stats()
    assert 0.0 < first["min"] < first["mean"] < first["max"] < 1.0 and first["std"] > 0.0
    stats = model.context_statistics()
    assert stats["gate_min"] == first["min"] and stats["gate_max"] == first["max"]
    assert stats["gate_mean"] == pytest.approx((first["mean"] + 0.5) / 2)

    model.eval()  # evaluation leaves the training record alone
    with torch.no_grad():
        model.flow_forward(tiny_features[:1] * 3.0)
    assert subnets[0].get_last_gate_stats() == first


def _fit_two_epochs(root: Path, widget_root: Path, overrides: dict[str, object]) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` a two-epoch fit on the widget data writes through :func:`task_logger`."""
    torch.manual_seed(0)
    model = MoLEFlow(config=tiny_config(**overrides), evaluator=False, visualizer=False)
    datamodule = MVTecADLocal(root=widget_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(
        max_epochs=2, accelerator="cpu", devices=1, default_root_dir=root, enable_progress_bar=False,
        logger=task_logger(root, 0, "widget"), limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    with (task_log_dir(root, 0, "widget") / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _epoch_values(rows: list[dict[str, str]], column: str) -> list[float]:
    return [float(row[column]) for row in rows if row.get(column)]


@pytest.mark.parametrize(
    ("overrides", "present", "absent"),
    [
        (GATE, ("gate_mean/block_0", "gate_std/block_1", "gate_min", "gate_max", "gate_mean"), ("context_alpha/block_0", "alpha_mean")),
        (ALPHA, ("context_alpha/block_0", "context_alpha/block_1", "alpha_mean"), ("gate_mean/block_0", "gate_mean")),
        (NO_CONTEXT, (), ("context_alpha/block_0", "alpha_mean", "gate_mean/block_0", "gate_mean")),
    ],
    ids=["baseline_2_0_gate", "baseline_1_5_alpha", "no_context"],
)
def test_metrics_csv_has_the_context_columns_per_epoch(
    tmp_path: Path, widget_root: Path, overrides: dict[str, object], present: tuple[str, ...], absent: tuple[str, ...]
) -> None:
    rows = _fit_two_epochs(tmp_path, widget_root, overrides)
    header = set(rows[0])
    assert "train_loss_epoch" in header
    assert not header & set(absent)
    for column in present:
        values = _epoch_values(rows, column)
        assert len(values) == 2, column  # one value per epoch
        assert all(math.isfinite(v) for v in values), column
        if column.startswith("gate"):
            assert all(0.0 <= v <= 1.0 for v in values), column
    if overrides is ALPHA:
        assert all(0.0 < v < 0.2 for v in _epoch_values(rows, "alpha_mean"))  # bounded by context_max_alpha
    epochs = sorted({row["epoch"] for row in rows})
    assert epochs == ["0", "1"]
