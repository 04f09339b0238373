"""The metric maths of the continual evaluation: exact AUROC / AP of raw or normalised scores,
checked against scikit-learn."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from anomalib_moleflow.continual.metrics import (
    image_and_pixel_metrics,
    image_f1,
    unit_range,
)
from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator


def test_pixel_metrics_match_scikit_learn_on_smoothed_maps() -> None:
    torch.manual_seed(0)
    masks = torch.zeros(48, 256, 256, dtype=torch.bool)
    masks[24:, 100:140, 90:150] = True
    patch_scores = torch.randn(48, 16, 16) * 3 + 20
    patch_scores[24:, 6:9, 5:9] += 2.0  # a weak defect signal, so the AUROC is far from 1
    maps = AnomalyMapGenerator((256, 256), sigma=4.0)(patch_scores)[:, 0]  # raw NLL-like values ~20
    labels = torch.tensor([0] * 24 + [1] * 24)
    scores = maps.flatten(1).amax(1)
    out = image_and_pixel_metrics(scores, maps, labels, masks)
    assert set(out) == {"image_AUROC", "pixel_AUROC", "pixel_AP"}
    flat_masks, flat_maps = masks.flatten().numpy(), maps.flatten().double().numpy()
    assert abs(out["pixel_AUROC"] - roc_auc_score(flat_masks, flat_maps)) < 1e-6
    assert abs(out["pixel_AP"] - average_precision_score(flat_masks, flat_maps)) < 1e-4
    assert 0.6 < out["pixel_AUROC"] < 0.99
    assert abs(out["image_AUROC"] - roc_auc_score(labels.numpy(), scores.double().numpy())) < 1e-6


def test_image_auroc_of_large_raw_scores_is_not_saturated() -> None:
    # raw NLL-like scores far above 1: a sigmoid would turn them all into 1.0 (AUROC 0.5)
    scores = torch.tensor([50.0, 51.0, 52.0, 60.0, 61.0, 62.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    maps = torch.zeros(6, 4, 4)
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    assert image_and_pixel_metrics(scores, maps, labels, masks)["image_AUROC"] == 1.0


def test_image_auroc_with_ties_and_negative_scores_matches_scikit_learn() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-3, 3, (40,), generator=g).float() * 7.5  # many ties, negative values
    labels = torch.randint(0, 2, (40,), generator=g)
    out = image_and_pixel_metrics(scores, torch.zeros(40, 2, 2), labels, None)
    assert out == {"image_AUROC": pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)}


def test_metrics_left_out_when_undefined() -> None:
    scores, maps = torch.rand(4), torch.rand(4, 3, 3)
    one_class = torch.zeros(4, dtype=torch.long)
    some = torch.zeros(4, 3, 3, dtype=torch.bool)
    some[1, 0, 0] = True
    assert set(image_and_pixel_metrics(scores, maps, one_class, some)) == {"pixel_AUROC", "pixel_AP"}
    two_class = torch.tensor([0, 1, 0, 1])
    assert set(image_and_pixel_metrics(scores, maps, two_class, None)) == {"image_AUROC"}
    assert set(image_and_pixel_metrics(scores, maps, two_class, torch.zeros(4, 3, 3, dtype=torch.bool))) == {"image_AUROC"}
    assert set(image_and_pixel_metrics(scores, maps, two_class, torch.ones(4, 3, 3, dtype=torch.bool))) == {"image_AUROC"}
    assert image_and_pixel_metrics(scores, maps, one_class, None) == {}


def test_unit_range() -> None:
    values = torch.tensor([20.0, 50.0, 35.0, -10.0])
    scaled = unit_range(values)
    assert scaled.dtype == torch.float64
    assert torch.equal(scaled, torch.tensor([0.5, 1.0, 0.75, 0.0], dtype=torch.float64))
    assert torch.equal(scaled.argsort(), values.argsort())  # order kept
    constant = unit_range(torch.full((3,), 7.0))
    assert torch.equal(constant, torch.zeros(3, dtype=torch.float64))


def test_image_f1_at_the_threshold_matches_scikit_learn() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(50, generator=g)
    labels = (torch.rand(50, generator=g) < 0.4).long()
    expected = f1_score(labels.numpy(), (scores > 0.5).numpy())
    assert image_f1(scores, labels) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < expected < 1.0
    # a score exactly at the threshold is normal (anomalib's post-processor labels scores > threshold)
    assert image_f1(torch.tensor([0.5, 0.9]), torch.tensor([1, 1])) == pytest.approx(2 / 3)
    assert image_f1(torch.tensor([0.2, 0.7]), torch.tensor([0, 1]), threshold=0.1) == pytest.approx(2 / 3)


def test_image_f1_is_undefined_without_anomalous_images() -> None:
    assert image_f1(torch.tensor([0.1, 0.9]), torch.tensor([0, 0])) is None
