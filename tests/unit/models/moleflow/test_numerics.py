"""Counting non-finite training steps, and finding non-finite tensors by name."""

from __future__ import annotations

import pytest
import torch

from anomalib_moleflow.models.moleflow.numerics import CONSECUTIVE_LIMIT, NonFiniteSteps, NonFiniteTrainingError, non_finite_tensors


def test_a_finite_step_resets_the_run_and_the_limit_stops_with_the_cause() -> None:
    steps = NonFiniteSteps()
    for step in range(CONSECUTIVE_LIMIT - 1):
        steps.record(False, epoch=0, step=step)
        steps.check("0 ('bottle')", lr=1e6)
    steps.record(True, 0, 99)
    assert steps.consecutive == 0 and steps.total == CONSECUTIVE_LIMIT - 1 and steps.first == (0, 0)
    for step in range(CONSECUTIVE_LIMIT):
        steps.record(False, epoch=1, step=100 + step)
    with pytest.raises(NonFiniteTrainingError, match=r"task 0 \('bottle'\).*optim\.lr=1e\+06"):
        steps.check("0 ('bottle')", lr=1e6)
    steps.reset()
    assert steps.total == 0 and steps.first is None


def test_non_finite_tensors_are_named_integers_ignored() -> None:
    state = {
        "ok": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf": torch.tensor(float("inf")),
        "count": torch.tensor([3]),
        "note": "text",
    }
    assert non_finite_tensors(state) == ["nan", "inf"]
