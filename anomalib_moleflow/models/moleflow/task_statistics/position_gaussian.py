"""Position-conditional Gaussian patch score, added to the flow's patch NLL (beyond the notes).

Per task: the mean patch feature at every grid position and one covariance of the residuals
shared by all positions (shrunk toward a scaled identity). A patch's score is its Gaussian
negative log-likelihood up to a constant, ``0.5 * (x - mu_p)^T P (x - mu_p)``; the anomaly map
adds it to the flow's NLL (a product of the two densities)::

    patch score = flow NLL + weight * 0.5 * squared Mahalanobis(x, mu_p)

It costs per task ``H*W*C`` means and a ``C x C`` precision (about 62 k numbers at a 16x16 grid
of 152 channels).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..gaussian import precision_of
from .base import TaskStatistics


class _TaskPositionGaussian(nn.Module):
    def __init__(self, grid_size: tuple[int, int], channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(*grid_size, channels))
        self.register_buffer("precision", torch.zeros(channels, channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


class PositionGaussian(TaskStatistics):
    """Per-task position-conditional Gaussian over ``(B, H, W, C)`` patch features.

    Args:
        grid_size: ``(H, W)`` of the patch grid.
        channels: ``C``, the patch feature width.
        shrinkage: The covariance gets ``shrinkage * mean(diag)`` added to its diagonal.
    """

    def __init__(self, grid_size: tuple[int, int], channels: int, shrinkage: float = 0.1) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.channels = channels
        self.shrinkage = shrinkage

    def _new_task(self) -> nn.Module:
        return _TaskPositionGaussian(self.grid_size, self.channels)

    def _check(self, features: torch.Tensor) -> None:
        if features.ndim != 4 or tuple(features.shape[1:]) != (*self.grid_size, self.channels):
            msg = (
                f"PositionGaussian expects features of shape (B, {self.grid_size[0]}, {self.grid_size[1]}, "
                f"{self.channels}), got {tuple(features.shape)}"
            )
            raise ValueError(msg)

    @torch.no_grad()
    def fit(self, key: str, features: Iterable[torch.Tensor]) -> None:
        """Fit task ``key`` from its training features (an iterable of ``(B, H, W, C)`` chunks)."""
        chunks = [f[..., : self.channels].double() for f in features]
        for chunk in chunks:
            self._check(chunk)
        count = sum(len(c) for c in chunks)
        if count < 2:
            msg = f"PositionGaussian.fit needs at least 2 training images for task {key!r}, got {count}"
            raise ValueError(msg)
        mean = sum(c.sum(0) for c in chunks) / count
        scatter = torch.zeros(self.channels, self.channels, dtype=torch.float64, device=mean.device)
        for chunk in chunks:
            residual = (chunk - mean).reshape(-1, self.channels)
            scatter += residual.T @ residual
        cov = scatter / (count * self.grid_size[0] * self.grid_size[1] - 1)
        scale = cov.diagonal().mean().clamp_min(1e-12)
        precision = precision_of(cov, self.shrinkage * scale + 1e-9 * scale)
        self._store(key, mean=mean, precision=precision)

    def forward(self, key: str, features: torch.Tensor) -> torch.Tensor:
        """``0.5 *`` squared Mahalanobis distance ``(B, H, W)`` of each patch to task ``key``'s position mean."""
        x = features[..., : self.channels]
        self._check(x)
        state = self.tasks[key]
        diff = x - state.mean.to(x.dtype)
        return 0.5 * ((diff @ state.precision.to(x.dtype)) * diff).sum(dim=-1)
