"""Gaussian maths shared by the router and the scoring statistics: pooling, Ledoit-Wolf shrinkage,
fitting, and Mahalanobis distances.

With ~200 images and hundreds of channels the sample covariance is (nearly) singular, and a fixed
``+1e-5 I`` leaves distances dominated by noise directions. :func:`fit_gaussian` therefore
shrinks toward ``mu * I`` (``mu`` = mean variance) with the Ledoit-Wolf weight (closed form) and
adds a scale-invariant ridge ``ridge * mu``. Fits run in float64.
"""

from __future__ import annotations

import torch

__all__ = ["fit_gaussian", "ledoit_wolf_covariance", "mahalanobis", "pool_features", "precision_of"]


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """Global average of patch features ``(B, H, W, C)`` -> ``(B, C)``."""
    if features.dim() != 4:
        msg = f"pool_features expects (B, H, W, C) features, got shape {tuple(features.shape)}"
        raise ValueError(msg)
    return features.mean(dim=(1, 2))


def ledoit_wolf_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred samples ``x`` ``(N, C)`` (same dtype)."""
    n, c = x.shape
    emp = x.T @ x / n
    mu = torch.diagonal(emp).sum() / c
    x2 = x**2
    delta_ = (emp**2).sum()
    beta_ = ((x2.T @ x2).sum() / n - delta_) / (c * n)
    delta = (delta_ - 2 * mu * torch.diagonal(emp).sum() + c * mu**2) / c
    beta = torch.minimum(beta_, delta).clamp_min(0)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(delta))
    shrunk = (1 - shrinkage) * emp
    shrunk.diagonal().add_(shrinkage * mu)
    return shrunk


def precision_of(cov: torch.Tensor, diagonal_load: float | torch.Tensor) -> torch.Tensor:
    """Inverse of ``cov + diagonal_load * I`` through its Cholesky factor (``cov`` is changed in place)."""
    cov.diagonal().add_(diagonal_load)
    return torch.cholesky_inverse(torch.linalg.cholesky(cov))


def fit_gaussian(x: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision (inverse Ledoit-Wolf covariance plus ``ridge * mu``) of ``x`` ``(N, C)``, in float64.

    With one sample, or identical samples (zero variance), the precision is the identity
    (Euclidean distance).
    """
    x = x.double()
    mean = x.mean(dim=0)
    cov = ledoit_wolf_covariance(x - mean) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1]).to(x)
    mu = torch.diagonal(cov).mean().item()
    if mu <= 0:
        return mean, torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return mean, precision_of(cov, ridge * mu)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances ``(N,)`` of ``x`` ``(N, C)`` (float64 arithmetic)."""
    diff = x.double() - mean.double()
    squared = ((diff @ precision.double()) * diff).sum(dim=1)
    return squared.clamp_min(0).sqrt()
