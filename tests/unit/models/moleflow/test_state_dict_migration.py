"""Pre-format-2 state dicts renamed onto today's modules: router slots and normaliser stats become
``TaskStatistics`` tasks, the normaliser's "fitted" comes from its NaN thresholds."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import REPO

from anomalib_moleflow.models.moleflow.state_dict_migration import (
    migrate_legacy_keys,
    task_keys_in,
)
from anomalib_moleflow.models.moleflow.task_statistics import THRESHOLD_NAMES

LEGACY = REPO / "tests" / "fixtures" / "legacy_v1"


def _normalizer(prefix: str, key: str, threshold: float) -> dict[str, torch.Tensor]:
    """A legacy ``normalizer.stats.<key>`` entry (no ``fitted`` flag: NaN meant unfitted)."""
    values = dict.fromkeys(THRESHOLD_NAMES, 1.0)
    values["image_threshold"] = threshold
    return {f"{prefix}normalizer.stats.{key}.{name}": torch.tensor(value) for name, value in values.items()}


def _slot(head: str, key: str) -> dict[str, torch.Tensor]:
    """A legacy router slot under ``head`` (``router.slots.`` or ``router.prototype.slots.``)."""
    return {
        f"{head}{key}.mean": torch.full((3,), float(key)),
        f"{head}{key}.precision": torch.eye(3),
        f"{head}{key}.calibration": torch.tensor(2.0),
        f"{head}{key}.fitted": torch.tensor(True),
    }


@pytest.mark.parametrize("router_head", ["router.slots.", "router.prototype.slots."])
def test_legacy_keys_are_renamed_and_thresholds_get_fitted_flags(router_head: str) -> None:
    prefix = "model."
    state = {
        **_normalizer(prefix, "0", 3.5),
        **_normalizer(prefix, "1", float("nan")),  # a task whose thresholds were never fitted
        **_slot(prefix + router_head, "0"),
        **_slot(prefix + router_head, "1"),
        "model.flow.weight": torch.ones(2),
    }
    originals = {name: value for name, value in state.items()}
    migrate_legacy_keys(state, prefix)
    assert not [name for name in state if "normalizer" in name or "slots" in name]
    for key in ("0", "1"):
        for name in THRESHOLD_NAMES:
            assert state[f"model.thresholds.tasks.{key}.{name}"] is originals[f"model.normalizer.stats.{key}.{name}"]
        for name in ("mean", "precision", "calibration", "fitted"):
            assert state[f"model.router.tasks.{key}.{name}"] is originals[f"model.{router_head}{key}.{name}"]
    assert state["model.thresholds.tasks.0.fitted"].dtype == torch.bool
    assert bool(state["model.thresholds.tasks.0.fitted"]) is True
    assert bool(state["model.thresholds.tasks.1.fitted"]) is False
    assert state["model.flow.weight"] is originals["model.flow.weight"]
    assert len(state) == len(originals) + 2  # one flag per threshold task


def test_migration_only_touches_keys_under_the_prefix_and_is_idempotent() -> None:
    state = {**_normalizer("", "0", 1.0), **_normalizer("model.", "0", 1.0), **_slot("other.router.slots.", "0")}
    migrate_legacy_keys(state, "model.")
    assert "normalizer.stats.0.image_threshold" in state  # another prefix: left alone
    assert "other.router.slots.0.mean" in state
    assert "model.thresholds.tasks.0.fitted" in state
    once = dict(state)
    migrate_legacy_keys(state, "model.")
    assert state == once  # today's keys: a no-op


def test_task_keys_come_from_the_thresholds_in_numeric_order() -> None:
    state = {f"m.thresholds.tasks.{key}.image_min": torch.tensor(0.0) for key in ("10", "2", "0", "1")}
    state["m.thresholds.tasks.2.fitted"] = torch.tensor(True)
    state["m.router.tasks.11.mean"] = torch.zeros(1)  # only the thresholds name the experts
    state["n.thresholds.tasks.5.image_min"] = torch.tensor(0.0)
    assert task_keys_in(state, "m.") == ["0", "1", "2", "10"]
    assert task_keys_in(state, "x.") == []


@pytest.mark.parametrize(("name", "fitted"), [("continual_task_01.ckpt", [True, True]), ("single_task.ckpt", [False])])
def test_the_checkpoints_written_before_format_2_migrate(name: str, fitted: list[bool]) -> None:
    """The real files the project wrote before format 2 (``tests/fixtures/legacy_v1``): the
    continual run fitted its tasks' thresholds, the single-task ``anomalib fit`` left them NaN."""
    state = torch.load(LEGACY / name, map_location="cpu", weights_only=True)["state_dict"]
    thresholds = {k: float(v) for k, v in state.items() if k.startswith("model.normalizer.stats.") and k.endswith("image_threshold")}
    assert thresholds  # the fixture does hold the legacy names
    migrate_legacy_keys(state, "model.")
    assert not [k for k in state if ".slots." in k or ".normalizer." in k]
    keys = task_keys_in(state, "model.")
    assert keys == [str(i) for i in range(len(fitted))]
    assert [bool(state[f"model.thresholds.tasks.{k}.fitted"]) for k in keys] == fitted
    for key in keys:
        assert math.isfinite(thresholds[f"model.normalizer.stats.{key}.image_threshold"]) == bool(
            state[f"model.thresholds.tasks.{key}.fitted"]
        )
        assert f"model.router.tasks.{key}.mean" in state
