"""Continual evaluation metrics: exact AUROC / AP over millions of pixels."""

import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalib_moleflow.continual.evaluation import _metrics
from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator


def test_pixel_metrics_match_scikit_learn_on_smoothed_maps() -> None:
    torch.manual_seed(0)
    masks = torch.zeros(48, 256, 256, dtype=torch.bool)
    masks[24:, 100:140, 90:150] = True
    patch_scores = torch.randn(48, 16, 16) * 3 + 20
    patch_scores[24:, 6:9, 5:9] += 2.0  # a weak defect signal, so the AUROC is far from 1
    maps = AnomalyMapGenerator((256, 256), sigma=4.0)(patch_scores)[:, 0]  # raw NLL-like values ~20
    labels = torch.tensor([0] * 24 + [1] * 24)
    out = _metrics(maps.flatten(1).amax(1), maps, labels, masks)
    flat_masks, flat_maps = masks.flatten().numpy(), maps.flatten().double().numpy()
    assert abs(out["pixel_AUROC"] - roc_auc_score(flat_masks, flat_maps)) < 1e-6
    assert abs(out["pixel_AP"] - average_precision_score(flat_masks, flat_maps)) < 1e-4
    assert 0.6 < out["pixel_AUROC"] < 0.99


def test_image_auroc_of_large_raw_scores_is_not_saturated() -> None:
    # raw NLL-like scores far above 1: a sigmoid would turn them all into 1.0 (AUROC 0.5)
    scores = torch.tensor([50.0, 51.0, 52.0, 60.0, 61.0, 62.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    maps = torch.zeros(6, 4, 4)
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    assert _metrics(scores, maps, labels, masks)["image_AUROC"] == 1.0
