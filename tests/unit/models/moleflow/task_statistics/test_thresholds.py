"""Per-task score normalisation and thresholds: anomalib's min-max formula with each task's
threshold at 0.5, and F1-optimal thresholds (checked against a brute-force F1 search)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import same_bits

from anomalib_moleflow.models.moleflow.task_statistics import (
    THRESHOLD_NAMES,
    TaskStatistics,
    TaskThresholds,
)
from anomalib_moleflow.models.moleflow.task_statistics.thresholds import (
    NORMAL_SCORE_QUANTILE,
    f1_threshold,
)

VALUES = {
    "image_min": 1.0,
    "image_max": 5.0,
    "image_threshold": 3.0,
    "pixel_min": -2.0,
    "pixel_max": 6.0,
    "pixel_threshold": 0.0,
}


def _brute_force_f1(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(best F1, lowest threshold reaching it)`` over every score as threshold (``score >= t``)."""
    best, best_threshold = -1.0, math.nan
    for t in sorted(set(scores.tolist())):
        predicted = scores >= t
        tp = int((predicted & (labels == 1)).sum())
        fp = int((predicted & (labels == 0)).sum())
        fn = int((~predicted & (labels == 1)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best + 1e-12:
            best, best_threshold = f1, t
    return best, best_threshold


def _f1_at(threshold: float, scores: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = scores >= threshold
    tp = int((predicted & (labels == 1)).sum())
    return 2 * tp / (2 * tp + int((predicted & (labels == 0)).sum()) + int((~predicted & (labels == 1)).sum()))


# ----------------------------------------------------------------------------- normalisation
def test_normalisation_is_anomalibs_min_max_formula_per_task() -> None:
    thresholds = TaskThresholds()
    assert isinstance(thresholds, TaskStatistics)
    thresholds.fit("0", **VALUES)
    thresholds.fit("1", **{**VALUES, "image_threshold": 2.0, "image_max": 9.0})
    scores = torch.tensor([-10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 30.0])
    maps = torch.tensor([[[-2.0, 0.0], [2.0, 100.0]]])
    pred, amap = thresholds.normalize("0", scores, maps)
    expected = ((scores - 3.0) / (5.0 - 1.0) + 0.5).clamp(0, 1)
    assert torch.allclose(pred, expected)
    assert pred.tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # the threshold lands at 0.5
    assert torch.allclose(amap, ((maps - 0.0) / 8.0 + 0.5).clamp(0, 1))
    assert amap.tolist() == [[[0.25, 0.5], [0.75, 1.0]]]
    # another task, another scale
    pred1, _ = thresholds.normalize("1", scores, maps)
    assert torch.allclose(pred1, ((scores - 2.0) / 8.0 + 0.5).clamp(0, 1))


def test_normalisation_with_zero_span_is_finite() -> None:
    thresholds = TaskThresholds()
    thresholds.fit("0", **{**VALUES, "image_min": 3.0, "image_max": 3.0})
    pred, _ = thresholds.normalize("0", torch.tensor([2.0, 3.0, 4.0]), torch.zeros(1, 1, 1))
    assert pred.tolist() == [0.0, 0.5, 1.0]


def test_fit_needs_every_value_and_values_are_nan_until_fitted() -> None:
    thresholds = TaskThresholds()
    thresholds.add_task("0")
    assert all(math.isnan(v) for v in thresholds.values("0").values())
    assert set(thresholds.values("0")) == set(THRESHOLD_NAMES)
    assert not thresholds.fitted("0")
    with pytest.raises(ValueError, match="task '0' needs pixel_max, pixel_min, pixel_threshold"):
        thresholds.fit("0", image_min=0.0, image_max=1.0, image_threshold=0.5)
    assert not thresholds.fitted("0")
    thresholds.fit("0", **VALUES)
    assert thresholds.fitted("0") and thresholds.values("0") == VALUES


def test_state_dict_round_trip() -> None:
    thresholds = TaskThresholds()
    thresholds.fit("0", **VALUES)
    thresholds.add_task("1")
    fresh = TaskThresholds()
    fresh.load_state_dict(thresholds.state_dict())
    assert fresh.task_keys == ["0", "1"] and fresh.fitted("0") and not fresh.fitted("1")
    assert fresh.values("0") == VALUES
    for name, value in thresholds.state_dict().items():
        assert same_bits(fresh.state_dict()[name], value), name


# ----------------------------------------------------------------------------- F1 thresholds
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_threshold_matches_a_brute_force_search(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(60, generator=generator) < 0.4).long()
    scores = torch.randn(60, generator=generator) + 1.2 * labels  # overlapping classes
    best_f1, best_threshold = _brute_force_f1(scores, labels)
    threshold = f1_threshold(scores, labels, fallback=float(scores.max()))
    assert _f1_at(threshold, scores, labels) == pytest.approx(best_f1)
    assert threshold == pytest.approx(best_threshold)


def test_f1_threshold_of_separable_scores_separates_them() -> None:
    scores = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.7, 0.8])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert f1_threshold(scores, labels, fallback=0.9) == pytest.approx(0.7)


@pytest.mark.parametrize("label", [0, 1])
def test_f1_threshold_of_one_class_is_the_fallback(label: int) -> None:
    scores = torch.tensor([0.1, 0.4, 0.2])
    assert f1_threshold(scores, torch.full((3,), label), fallback=0.4) == 0.4


def test_fit_from_scores_with_masks() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([1.0, 2.0, 2.5, 2.2, 4.0, 5.0])
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    masks[3:, 1:3, 1:3] = True
    maps = torch.rand(6, 4, 4, generator=generator) + 1.5 * masks
    thresholds = TaskThresholds()
    values = thresholds.fit_from_scores("3", scores, maps, labels, masks)
    assert thresholds.fitted("3") and thresholds.task_keys == ["3"]
    assert thresholds.values("3") == pytest.approx(values)  # returned and stored (float32) alike
    assert values["image_min"] == 1.0 and values["image_max"] == 5.0
    assert values["pixel_min"] == pytest.approx(float(maps.min()))
    assert values["pixel_max"] == pytest.approx(float(maps.max()))
    assert values["image_threshold"] == pytest.approx(_brute_force_f1(scores, labels)[1])
    pixel_f1, _ = _brute_force_f1(maps.flatten(), masks.flatten().long())
    assert _f1_at(values["pixel_threshold"], maps.flatten(), masks.flatten().long()) == pytest.approx(pixel_f1)
    assert values["pixel_threshold"] != values["image_threshold"]


def test_fit_from_scores_without_masks_uses_the_image_threshold() -> None:
    thresholds = TaskThresholds()
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    maps = torch.arange(16.0).reshape(4, 2, 2)
    values = thresholds.fit_from_scores("0", scores, maps, torch.tensor([0, 0, 1, 1]), None)
    assert values["image_threshold"] == pytest.approx(3.0)
    assert values["pixel_threshold"] == values["image_threshold"]
    assert (values["pixel_min"], values["pixel_max"]) == (0.0, 15.0)


def test_fit_from_scores_of_normal_images_only_thresholds_at_a_high_quantile() -> None:
    """Held-out normal images: no F1 to optimise; the image threshold is the 0.99 quantile of their
    scores (between the two largest of 11 here), and the pixel threshold the same value."""
    assert NORMAL_SCORE_QUANTILE == 0.99
    thresholds = TaskThresholds()
    scores = torch.arange(11.0)  # 0 .. 10
    maps = torch.arange(11.0 * 4).reshape(11, 2, 2)
    values = thresholds.fit_from_scores("0", scores, maps, torch.zeros(11, dtype=torch.long), torch.zeros(11, 2, 2, dtype=torch.bool))
    assert values["image_threshold"] == pytest.approx(9.9)  # 0.99 * 10 (linear interpolation)
    assert 9.0 < values["image_threshold"] < 10.0  # the largest normal score lies above it
    assert values["pixel_threshold"] == values["image_threshold"]
    assert (values["image_min"], values["image_max"]) == (0.0, 10.0)
    # a normal image at the threshold normalises to 0.5; the largest one above it
    normalized, _ = thresholds.normalize("0", torch.tensor([9.9, 10.0]), maps[:1])
    assert normalized[0] == pytest.approx(0.5) and normalized[1] > 0.5
