"""Image-level fusion of the flow score with a global Gaussian score (beyond the notes).

The flow scores patches; an object that is missing or misplaced as a whole can leave every patch
plausible. A per-task Gaussian over globally pooled backbone features (mean, Ledoit-Wolf
precision, as the router's) catches those. Both scores are z-normalised with the task's own
training images, then added::

    score = z(flow top-k) + weight * z(squared Mahalanobis of pooled features)
"""

from __future__ import annotations

import torch
from torch import nn

from ..gaussian import fit_gaussian, mahalanobis
from .base import TaskStatistics


class _TaskGaussian(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("precision", torch.zeros(channels, channels))
        self.register_buffer("stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # flow mu, sd; global mu, sd
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


class GlobalScoreFusion(TaskStatistics):
    """Per-task fusion of flow image scores with a pooled-feature Mahalanobis score.

    Args:
        channels: Width of the pooled features.
        weight: Weight of the global z-score (the flow z-score has weight 1).
    """

    def __init__(self, channels: int, weight: float) -> None:
        super().__init__()
        self.channels = channels
        self.weight = weight

    def _new_task(self) -> nn.Module:
        return _TaskGaussian(self.channels)

    def global_score(self, key: str, pooled: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance ``(B,)`` of pooled features to task ``key``."""
        state = self.tasks[key]
        return mahalanobis(pooled, state.mean, state.precision).square().to(pooled.dtype)

    @torch.no_grad()
    def fit(self, key: str, pooled: torch.Tensor, flow_scores: torch.Tensor) -> None:
        """Fit task ``key`` from its training images' pooled features and flow image scores."""
        if len(pooled) < 2:
            msg = f"GlobalScoreFusion.fit needs at least 2 training images for task {key!r}, got {len(pooled)}"
            raise ValueError(msg)
        mean, precision = fit_gaussian(pooled, ridge=1e-5)
        self.add_task(key)
        state = self.tasks[key]
        state.mean.copy_(mean.to(state.mean))
        state.precision.copy_(precision.to(state.precision))
        global_scores = self.global_score(key, pooled).double()
        flow_scores = flow_scores.double()
        eps = 1e-6
        stats = torch.stack([
            flow_scores.mean(),
            flow_scores.std().clamp_min(eps),
            global_scores.mean(),
            global_scores.std().clamp_min(eps),
        ])
        self._store(key, stats=stats)

    def forward(self, key: str, flow_scores: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Fused image scores ``(B,)``; the flow scores unchanged while ``key`` is unfitted."""
        if not self.fitted(key):
            return flow_scores
        stats = self.tasks[key].stats.to(flow_scores.dtype)
        z_flow = (flow_scores - stats[0]) / stats[1]
        z_global = (self.global_score(key, pooled) - stats[2]) / stats[3]
        return z_flow + self.weight * z_global
