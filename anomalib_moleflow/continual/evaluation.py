"""Evaluate a continual MoLE-Flow model on one task: routed (no task id) and oracle.

Backbone features of each test batch are computed once and scored twice: through the
router, and through the true task's expert. Metrics are image AUROC, pixel AUROC and
pixel AP on that task's test set, plus routing accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from anomalib.data import AnomalibDataModule
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from anomalib_moleflow.models.moleflow import MoLEFlow


@dataclass
class TaskScores:
    """Raw outputs collected over one task's test set."""

    image_scores: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)

    def cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated image scores ``(N,)`` and maps ``(N, H, W)``."""
        return torch.cat(self.image_scores), torch.cat(self.maps)


def _unit_range(values: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] in float64 (order kept).

    torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid, which
    saturates raw scores such as NLLs of 20-50 into ties (pixel AUROC off by up to 0.2).
    """
    values = values.double()
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def _metrics(scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Image AUROC, pixel AUROC and pixel AP of raw or normalised scores (exact, any range)."""
    out: dict[str, float] = {}
    if labels.unique().numel() == 2:
        out["image_AUROC"] = float(binary_auroc(_unit_range(scores), labels))
    if masks is not None and masks.any() and not masks.all():
        flat_maps, flat_masks = _unit_range(maps.flatten()), masks.flatten().long()
        out["pixel_AUROC"] = float(binary_auroc(flat_maps, flat_masks))
        out["pixel_AP"] = float(binary_average_precision(flat_maps, flat_masks))
    return out


def _prepared(model: MoLEFlow, batch: object, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pre-processed images and a boolean ``(B, H, W)`` mask (resized to ``size`` if given)."""
    images, gt_mask = batch.image, batch.gt_mask
    if model.pre_processor is not None:
        images, gt_mask = model.pre_processor.transform(images, gt_mask)
    if gt_mask is None:
        return images, None
    mask = gt_mask.float()
    mask = mask[:, 0] if mask.ndim == 4 else mask
    if size is not None and mask.shape[-2:] != size:
        mask = F.interpolate(mask[:, None], size=size, mode="nearest")[:, 0]
    return images, mask.cpu() > 0.5


def _test_loader(datamodule: AnomalibDataModule):  # noqa: ANN202 - a torch DataLoader
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
    routed, oracle = TaskScores(), TaskScores()
    labels, masks, correct, total, seconds = [], [], 0, 0, 0.0
    for batch in _test_loader(datamodule):
        images, mask = _prepared(model, batch, torch_model.anomaly_map_generator.input_size)
        start = time.perf_counter()
        features = torch_model.extract_features(images)
        pred = torch_model.predict_features(features)
        seconds += time.perf_counter() - start
        route = torch_model.last_route if torch_model.routing_active else None
        with torch_model.oracle(key):
            ora = torch_model.predict_features(features)
        routed.image_scores.append(pred.pred_score.cpu())
        routed.maps.append(pred.anomaly_map[:, 0].cpu())
        oracle.image_scores.append(ora.pred_score.cpu())
        oracle.maps.append(ora.anomaly_map[:, 0].cpu())
        labels.append(batch.gt_label.cpu().long())
        if mask is not None:
            masks.append(mask)
        total += len(images)
        correct += len(images) if route is None else int((route.cpu() == task_index).sum())
    model.train(was_training)
    label_t = torch.cat(labels)
    mask_t = torch.cat(masks) if masks else None
    return {
        "routed": _metrics(*routed.cat(), label_t, mask_t),
        "oracle": _metrics(*oracle.cat(), label_t, mask_t),
        "routing_accuracy": correct / max(1, total),
        "n_images": total,
        "model_seconds": seconds,
    }


@torch.no_grad()
def fit_task_normalization(model: MoLEFlow, datamodule: AnomalibDataModule, task_index: int) -> dict[str, float]:
    """Set task ``task_index``'s min/max/F1-optimal thresholds from its validation set.

    Uses the true task id (these are the task's own statistics). Returns the values set.
    """
    from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold as F1AdaptiveThreshold  # noqa: N814

    torch_model = model.model
    key = torch_model.task_keys[task_index]
    datamodule.setup("fit")
    loader = datamodule.val_dataloader()
    scores, maps, labels, masks = [], [], [], []
    was_normalizing = torch_model.normalize_scores
    torch_model.normalize_scores = False
    model.eval()
    with torch_model.oracle(key):
        for batch in loader:
            images, mask = _prepared(model, batch, torch_model.anomaly_map_generator.input_size)
            pred = torch_model.predict_features(torch_model.extract_features(images))
            scores.append(pred.pred_score.cpu())
            maps.append(pred.anomaly_map[:, 0].cpu())
            labels.append(batch.gt_label.cpu().long())
            if mask is not None:
                masks.append(mask)
    torch_model.normalize_scores = was_normalizing
    score_t, map_t, label_t = torch.cat(scores), torch.cat(maps), torch.cat(labels)
    values = {
        "image_min": float(score_t.min()),
        "image_max": float(score_t.max()),
        "pixel_min": float(map_t.min()),
        "pixel_max": float(map_t.max()),
    }
    values["image_threshold"] = _adaptive_threshold(F1AdaptiveThreshold, score_t, label_t, values["image_max"])
    if masks:
        mask_t = torch.cat(masks)
        # a subsample of pixels keeps the threshold search cheap
        flat_maps, flat_masks = map_t.flatten(), mask_t.flatten().long()
        step = max(1, flat_maps.numel() // 500_000)
        values["pixel_threshold"] = _adaptive_threshold(
            F1AdaptiveThreshold, flat_maps[::step], flat_masks[::step], values["pixel_max"]
        )
    else:
        values["pixel_threshold"] = values["image_threshold"]
    torch_model.normalizer.ensure_task(key).set(**values)
    return values


def _adaptive_threshold(metric_cls: type, preds: torch.Tensor, target: torch.Tensor, fallback: float) -> float:
    """F1-optimal threshold; the maximum score when the set has one class only."""
    if target.unique().numel() < 2:
        return fallback
    metric = metric_cls()
    metric.update(preds, target)
    return float(metric.compute())

