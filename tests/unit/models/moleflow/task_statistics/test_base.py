"""The one per-task statistics mechanism: task creation, fitted flags, storing, and state dicts
that create the tasks they name and leave absent tasks unfitted."""

from __future__ import annotations

import pytest
import torch
from helpers import same_bits
from torch import nn

from anomalib_moleflow.models.moleflow.task_statistics import TaskStatistics


class _Holder(nn.Module):
    """One task's statistics of :class:`_Means`: a vector and the ``fitted`` flag."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


class _Means(TaskStatistics):
    """Minimal subclass: per task, the mean of its data."""

    def _new_task(self) -> nn.Module:
        return _Holder()

    def fit(self, key: str, x: torch.Tensor) -> None:
        """Store the mean and the number of rows of ``x``."""
        self._store(key, mean=x.double().mean(0), count=float(len(x)))


def test_the_base_class_needs_a_task_holder() -> None:
    with pytest.raises(NotImplementedError):
        TaskStatistics().add_task("0")


def test_add_task_creates_unfitted_tasks_once_in_order() -> None:
    stats = _Means()
    assert stats.task_keys == [] and stats.n_fitted == 0
    for key in ("0", "2", "1", "0"):
        stats.add_task(key)
    assert stats.task_keys == ["0", "2", "1"]
    assert stats.n_fitted == 0 and not any(stats.fitted(k) for k in stats.task_keys)
    assert not stats.fitted("9")
    holder = stats.tasks["0"]
    stats.add_task("0")
    assert stats.tasks["0"] is holder  # an existing task is kept, not reset


def test_store_creates_the_task_casts_to_the_buffers_and_marks_it_fitted() -> None:
    stats = _Means()
    stats.fit("1", torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))
    assert stats.task_keys == ["1"] and stats.fitted("1") and stats.n_fitted == 1
    state = stats.tasks["1"]
    assert state.mean.dtype == torch.float32 and torch.equal(state.mean, torch.tensor([2.0, 3.0, 4.0]))
    assert state.count.dtype == torch.long and int(state.count) == 2
    assert bool(state.fitted)
    stats.add_task("0")
    assert stats.n_fitted == 1 and stats.task_keys == ["1", "0"]


def test_new_tasks_follow_the_device_and_dtype_of_the_existing_ones() -> None:
    stats = _Means()
    stats.add_task("0")
    stats.to("meta")
    stats.add_task("1")
    assert stats.tasks["1"].mean.device.type == "meta"
    empty = _Means().to("meta")
    empty.add_task("0")  # no existing task to follow: the CPU (the owning model moves it afterwards)
    assert empty.tasks["0"].mean.device.type == "cpu"


def test_state_dict_creates_the_tasks_it_names_in_its_order() -> None:
    stats = _Means()
    stats.fit("b", torch.ones(2, 3))
    stats.add_task("a")  # created, never fitted
    stats.fit("c", torch.full((4, 3), 2.0))
    fresh = _Means()
    fresh.load_state_dict(stats.state_dict())
    assert fresh.task_keys == ["b", "a", "c"]
    assert fresh.fitted("b") and not fresh.fitted("a") and fresh.fitted("c") and fresh.n_fitted == 2
    for name, value in stats.state_dict().items():
        assert same_bits(fresh.state_dict()[name], value), name


def test_state_dict_fitted_flags_override_the_python_side() -> None:
    stats = _Means()
    stats.fit("0", torch.ones(2, 3))
    unfitted = _Means()
    unfitted.add_task("0")
    stats.load_state_dict(unfitted.state_dict())
    assert not stats.fitted("0") and stats.n_fitted == 0
    stats.load_state_dict(_fitted_state())
    assert stats.fitted("0")


def _fitted_state() -> dict[str, torch.Tensor]:
    stats = _Means()
    stats.fit("0", torch.ones(2, 3))
    return stats.state_dict()


def test_tasks_absent_from_the_state_dict_load_unfitted() -> None:
    """As a checkpoint written before the statistic existed: strict loading works and the task
    scores as that checkpoint did."""
    stats = _Means()
    stats.fit("0", torch.ones(2, 3))
    stats.add_task("1")
    stats.load_state_dict({})
    assert stats.task_keys == ["0", "1"]
    assert not stats.fitted("0") and not bool(stats.tasks["0"].fitted) and stats.n_fitted == 0
    # a state dict naming some tasks: those load, the others become unfitted
    stats.fit("0", torch.ones(2, 3))
    stats.fit("1", torch.ones(2, 3))
    stats.load_state_dict(_fitted_state())
    assert stats.fitted("0") and not stats.fitted("1")


def test_loading_inside_a_parent_module_uses_the_prefix() -> None:
    parent = nn.Module()
    parent.stats = _Means()
    parent.stats.fit("0", torch.ones(2, 3))
    parent.other = _Means()
    parent.other.fit("5", torch.zeros(2, 3))
    fresh = nn.Module()
    fresh.stats = _Means()
    fresh.other = _Means()
    fresh.load_state_dict(parent.state_dict())
    assert fresh.stats.task_keys == ["0"] and fresh.other.task_keys == ["5"]
    assert fresh.stats.fitted("0") and fresh.other.fitted("5")
