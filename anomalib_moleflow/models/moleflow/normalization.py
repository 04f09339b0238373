"""Per-task score normalisation and thresholds.

anomalib's post-processor keeps one set of min/max/threshold values. With several
products each expert's NLL lives on its own scale, so MoLE-Flow keeps these statistics
per task and maps every routed score to ``[0, 1]`` with the task's threshold at ``0.5``
(anomalib's own min-max formula): ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn


class TaskScoreStats(nn.Module):
    """Image and pixel min/max/threshold of one task (NaN until fitted)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("image_min", "image_max", "image_threshold", "pixel_min", "pixel_max", "pixel_threshold"):
            self.register_buffer(name, torch.tensor(float("nan")))

    @property
    def fitted(self) -> bool:
        """Whether statistics have been set."""
        return bool(torch.isfinite(self.image_threshold).item())

    def set(self, **values: float) -> None:
        """Set statistics by name (``image_min=...``, ...)."""
        for name, value in values.items():
            getattr(self, name).fill_(float(value))


def _normalize(x: torch.Tensor, threshold: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = (high - low).clamp(min=1e-12)
    return ((x - threshold) / span + 0.5).clamp(0.0, 1.0)


class TaskScoreNormalizer(nn.Module):
    """Per-task statistics keyed like the experts; survives checkpoints as buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = nn.ModuleDict()

    def ensure_task(self, key: str) -> TaskScoreStats:
        """Create (if needed) and return the statistics slot of ``key``."""
        if key not in self.stats:
            self.stats[key] = TaskScoreStats()
        return self.stats[key]

    def fitted(self, key: str) -> bool:
        """Whether task ``key`` has statistics."""
        return key in self.stats and self.stats[key].fitted

    def normalize(self, key: str, pred_score: torch.Tensor, anomaly_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map raw scores of task ``key`` to ``[0, 1]`` (threshold at 0.5)."""
        s = self.stats[key]
        return (
            _normalize(pred_score, s.image_threshold, s.image_min, s.image_max),
            _normalize(anomaly_map, s.pixel_threshold, s.pixel_min, s.pixel_max),
        )
