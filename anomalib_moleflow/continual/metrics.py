"""The metric maths of the continual evaluation: exact image AUROC, pixel AUROC and pixel AP of
raw or normalised scores, and the image F1 at the threshold of normalised scores."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from anomalib.metrics import F1Score
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
)

__all__ = ["image_and_pixel_metrics", "image_f1", "unit_range"]


def unit_range(values: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] in float64 (order kept).

    torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid, which saturates
    raw scores such as NLLs of 20-50 into ties (pixel AUROC off by up to 0.2).
    """
    values = values.double()
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def image_and_pixel_metrics(
    scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
) -> dict[str, float]:
    """Image AUROC (when both labels occur), pixel AUROC and pixel AP (when masks hold both
    classes) of scores ``(N,)`` and maps ``(N, H, W)`` of any range."""
    out: dict[str, float] = {}
    if labels.unique().numel() == 2:
        out["image_AUROC"] = float(binary_auroc(unit_range(scores), labels))
    if masks is not None and masks.any() and not masks.all():
        flat_maps, flat_masks = unit_range(maps.flatten()), masks.flatten().long()
        out["pixel_AUROC"] = float(binary_auroc(flat_maps, flat_masks))
        out["pixel_AP"] = float(binary_average_precision(flat_maps, flat_masks))
    return out


def image_f1(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float | None:
    """anomalib's ``F1Score`` of the labels ``scores > threshold`` (its post-processor's rule) against
    ``labels`` ``(N,)``; ``None`` when no image is anomalous (F1 undefined)."""
    if not bool(labels.bool().any()):
        return None
    metric = F1Score(fields=["pred_label", "gt_label"])
    metric.update(SimpleNamespace(pred_label=scores > threshold, gt_label=labels.long()))
    return float(metric.compute())
