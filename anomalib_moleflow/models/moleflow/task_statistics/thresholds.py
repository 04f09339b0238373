"""Per-task score normalisation and thresholds.

anomalib's post-processor keeps one set of min/max/threshold values. With several products each
expert's scores live on their own scale, so MoLE-Flow keeps these statistics per task and maps
every routed score to ``[0, 1]`` with the task's threshold at ``0.5`` (anomalib's own min-max
formula): ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``.

Thresholds are anomalib's F1-optimal ones on labelled images. When the images hold normal ones
only (e.g. training images held out for the thresholds), the image threshold is the
:data:`NORMAL_SCORE_QUANTILE` quantile of their scores, and the pixel threshold the same value.
"""

from __future__ import annotations

import torch
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold
from torch import nn

from .base import TaskStatistics

THRESHOLD_NAMES = ("image_min", "image_max", "image_threshold", "pixel_min", "pixel_max", "pixel_threshold")
NORMAL_SCORE_QUANTILE = 0.99
"""Quantile of the scores of normal-only images that becomes the threshold (about 1% of such
images land above it)."""


class _TaskThresholds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in THRESHOLD_NAMES:
            self.register_buffer(name, torch.tensor(float("nan")))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


def _normalize(x: torch.Tensor, threshold: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = (high - low).clamp(min=1e-12)
    return ((x - threshold) / span + 0.5).clamp(0.0, 1.0)


def f1_threshold(preds: torch.Tensor, target: torch.Tensor, fallback: float) -> float:
    """anomalib's F1-optimal threshold of ``preds`` for binary ``target``; ``fallback`` (the
    maximum score) when the set holds one class only."""
    if target.unique().numel() < 2:
        return fallback
    metric = _F1AdaptiveThreshold()
    metric.update(preds, target)
    return float(metric.compute())


class TaskThresholds(TaskStatistics):
    """Image and pixel min/max/threshold of each task, and the normalisation they define."""

    def _new_task(self) -> nn.Module:
        return _TaskThresholds()

    def fit(self, key: str, **values: float) -> None:
        """Set task ``key``'s statistics (all of :data:`THRESHOLD_NAMES`)."""
        missing = sorted(set(THRESHOLD_NAMES) - set(values))
        if missing:
            msg = f"TaskThresholds.fit of task {key!r} needs {', '.join(missing)}"
            raise ValueError(msg)
        self._store(key, **{name: float(values[name]) for name in THRESHOLD_NAMES})

    @torch.no_grad()
    def fit_from_scores(
        self, key: str, pred_score: torch.Tensor, anomaly_map: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, float]:
        """Fit task ``key`` from its raw scores on labelled images: min and max of the image scores
        ``(N,)`` and maps ``(N, H, W)``, and anomalib's F1-optimal thresholds (the pixel threshold
        from the masks ``(N, H, W)``, or the image threshold when there are none); with normal images
        only, the :data:`NORMAL_SCORE_QUANTILE` quantile of their scores. Returns the values."""
        values = {
            "image_min": float(pred_score.min()),
            "image_max": float(pred_score.max()),
            "pixel_min": float(anomaly_map.min()),
            "pixel_max": float(anomaly_map.max()),
        }
        if not label.any():  # normal images only: no F1 to optimise
            values["image_threshold"] = float(torch.quantile(pred_score.double(), NORMAL_SCORE_QUANTILE))
            values["pixel_threshold"] = values["image_threshold"]
            self.fit(key, **values)
            return values
        values["image_threshold"] = f1_threshold(pred_score, label, values["image_max"])
        if mask is not None:
            # a subsample of pixels keeps the threshold search cheap
            flat_maps, flat_masks = anomaly_map.flatten(), mask.flatten().long()
            step = max(1, flat_maps.numel() // 500_000)
            values["pixel_threshold"] = f1_threshold(flat_maps[::step], flat_masks[::step], values["pixel_max"])
        else:
            values["pixel_threshold"] = values["image_threshold"]
        self.fit(key, **values)
        return values

    def values(self, key: str) -> dict[str, float]:
        """Task ``key``'s statistics as floats (NaN while unfitted)."""
        state = self.tasks[key]
        return {name: float(getattr(state, name)) for name in THRESHOLD_NAMES}

    def normalize(self, key: str, pred_score: torch.Tensor, anomaly_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map raw scores of task ``key`` to ``[0, 1]`` (threshold at 0.5)."""
        s = self.tasks[key]
        return (
            _normalize(pred_score, s.image_threshold, s.image_min, s.image_max),
            _normalize(anomaly_map, s.pixel_threshold, s.pixel_min, s.pixel_max),
        )
