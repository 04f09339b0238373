"""Evaluate a continual MoLE-Flow model on one task: routed (no task id) and oracle.

Backbone features of each test batch are computed once and scored twice: through the router, and
through the true task's expert. Metrics (:mod:`.metrics`) are image AUROC, pixel AUROC and pixel
AP on that task's test set, the image F1 at the threshold (scores normalised per task, threshold
0.5), plus routing accuracy. :func:`task_thresholds` reads a task's fitted thresholds.
"""

from __future__ import annotations

import time

import torch
from anomalib.data import AnomalibDataModule
from torch.utils.data import DataLoader

from anomalib_moleflow.models.moleflow import MoLEFlow

from .metrics import image_and_pixel_metrics, image_f1

__all__ = ["evaluate_task", "loader_of_test_split", "task_thresholds"]


def loader_of_test_split(datamodule: AnomalibDataModule) -> DataLoader:
    """The test dataloader of a (not yet set up) datamodule."""
    datamodule.setup("test")
    return datamodule.test_dataloader()


@torch.no_grad()
def evaluate_task(model: MoLEFlow, datamodule: AnomalibDataModule, task_index: int) -> dict[str, object]:
    """Routed and oracle metrics of ``model`` on task ``task_index``'s test set.

    Returns a dict with ``routed`` and ``oracle`` metric dicts, ``routing_accuracy``,
    ``n_images`` and ``model_seconds`` (time spent in the model, routed pass).
    """
    torch_model = model.model
    key = torch_model.task_keys[task_index]
    was_training = model.training
    model.eval()
    routed_scores, routed_maps, oracle_scores, oracle_maps = [], [], [], []
    labels, masks, correct, total, seconds = [], [], 0, 0, 0.0
    for batch in loader_of_test_split(datamodule):
        images, mask = model.prepare_batch(batch)
        start = time.perf_counter()
        features = torch_model.extract_features(images)
        routed = torch_model.predict_features(features)
        seconds += time.perf_counter() - start
        with torch_model.oracle(key):
            oracle = torch_model.predict_features(features)
        routed_scores.append(routed.pred_score.cpu())
        routed_maps.append(routed.anomaly_map[:, 0].cpu())
        oracle_scores.append(oracle.pred_score.cpu())
        oracle_maps.append(oracle.anomaly_map[:, 0].cpu())
        labels.append(batch.gt_label.cpu().long())
        if mask is not None:
            masks.append(mask)
        total += len(images)
        correct += int((routed.pred_task.cpu() == task_index).sum())
    model.train(was_training)
    label_t = torch.cat(labels)
    mask_t = torch.cat(masks) if masks else None
    out: dict[str, dict[str, float]] = {}
    for mode, scores, maps in (("routed", routed_scores, routed_maps), ("oracle", oracle_scores, oracle_maps)):
        out[mode] = image_and_pixel_metrics(torch.cat(scores), torch.cat(maps), label_t, mask_t)
        f1 = image_f1(torch.cat(scores), label_t) if torch_model.normalizes_scores else None
        if f1 is not None:  # normalised scores: each task's threshold is 0.5
            out[mode]["image_F1"] = f1
    return {
        **out,
        "routing_accuracy": correct / max(1, total),
        "n_images": total,
        "model_seconds": seconds,
    }


@torch.no_grad()
def task_thresholds(model: MoLEFlow, task_index: int, pixel_fitted: bool = True) -> dict[str, float | None] | None:
    """Task ``task_index``'s image and pixel thresholds, raw and normalised (``None`` while not
    fitted); the pixel ones are ``None`` unless ``pixel_fitted`` (they were fitted on masks)."""
    thresholds = model.model.thresholds
    key = model.model.task_keys[task_index]
    if not thresholds.fitted(key):
        return None
    values = thresholds.values(key)
    raw_image, raw_pixel = torch.tensor([values["image_threshold"]]), torch.tensor([[values["pixel_threshold"]]])
    image, pixel = thresholds.normalize(key, raw_image, raw_pixel)
    return {
        "image_threshold": values["image_threshold"],
        "image_threshold_normalized": float(image[0]),
        "pixel_threshold": values["pixel_threshold"] if pixel_fitted else None,
        "pixel_threshold_normalized": float(pixel[0, 0]) if pixel_fitted else None,
    }
