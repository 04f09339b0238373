"""Position-conditional Gaussian patch score: per-position mean, one shared shrunk covariance."""

from __future__ import annotations

import pytest
import torch

from anomalib_moleflow.models.moleflow.task_statistics import (
    PositionGaussian,
    TaskStatistics,
)

GRID, CHANNELS = (4, 5), 3


def _features(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Patches whose mean depends on the grid position (as aligned products' do)."""
    generator = torch.Generator().manual_seed(seed)
    position_means = torch.arange(GRID[0] * GRID[1] * CHANNELS, dtype=torch.float32).view(*GRID, CHANNELS)
    return position_means + 0.1 * torch.randn(n, *GRID, CHANNELS, generator=generator)


def _fitted(shrinkage: float = 0.0) -> tuple[PositionGaussian, torch.Tensor]:
    """Gaussian fitted on 40 training images in two chunks: returns it and the images' features."""
    gaussian = PositionGaussian(GRID, CHANNELS, shrinkage=shrinkage)
    train = _features()
    gaussian.fit("0", [train[:16], train[16:]])  # chunks, as the feature cache delivers them
    return gaussian, train


def test_score_is_half_the_squared_mahalanobis_distance_to_the_position_mean() -> None:
    gaussian, train = _fitted()
    x = train.double()
    residual = (x - x.mean(0)).reshape(-1, CHANNELS)
    precision = torch.linalg.inv(residual.T @ residual / (len(residual) - 1))
    test = _features(3, seed=1)
    diff = test.double() - x.mean(0)
    expected = 0.5 * ((diff @ precision) * diff).sum(-1)
    assert torch.allclose(gaussian("0", test).double(), expected, rtol=1e-3, atol=1e-3)


def test_a_patch_normal_elsewhere_is_anomalous_at_the_wrong_position() -> None:
    gaussian, _ = _fitted(shrinkage=0.1)
    test = _features(1, seed=2)
    swapped = test.clone()
    swapped[0, 0, 0] = test[0, 3, 4]  # a valid patch, but from the opposite corner
    normal, moved = gaussian("0", test), gaussian("0", swapped)
    assert float(normal.max()) < 20
    assert float(moved[0, 0, 0]) > 100 * float(normal.max())
    assert torch.equal(moved[0].flatten()[1:], normal[0].flatten()[1:])  # other patches untouched


def test_state_dict_round_trip_creates_the_fitted_tasks() -> None:
    gaussian, train = _fitted()
    gaussian.add_task("1")  # created, never fitted
    other = PositionGaussian(GRID, CHANNELS)
    other.load_state_dict(gaussian.state_dict())
    assert other.fitted("0") and not other.fitted("1")
    assert torch.equal(other("0", train[:2]), gaussian("0", train[:2]))


def test_bad_shapes_and_too_few_images_are_named() -> None:
    gaussian, train = _fitted()
    with pytest.raises(ValueError, match=r"expects features of shape \(B, 4, 5, 3\), got \(2, 5, 4, 3\)"):
        gaussian("0", torch.zeros(2, 5, 4, 3))
    with pytest.raises(ValueError, match="at least 2 training images for task '1'"):
        gaussian.fit("1", [train[:1]])


def test_a_state_dict_without_statistics_loads_the_tasks_unfitted() -> None:
    """As a checkpoint written before the module existed: its tasks score with the flow alone."""
    gaussian = PositionGaussian(GRID, CHANNELS)
    gaussian.add_task("0")
    gaussian.load_state_dict({})
    assert not gaussian.fitted("0")
    fitted, _ = _fitted()
    assert fitted.fitted("0")
    fitted.load_state_dict({})
    assert not fitted.fitted("0") and not bool(fitted.tasks["0"].fitted)


def test_shrinkage_loads_the_diagonal_relative_to_the_mean_variance() -> None:
    gaussian, train = _fitted(shrinkage=0.5)
    assert isinstance(gaussian, TaskStatistics)
    x = train.double()
    residual = (x - x.mean(0)).reshape(-1, CHANNELS)
    cov = residual.T @ residual / (len(residual) - 1)
    scale = cov.diagonal().mean()
    expected = torch.linalg.inv(cov + (0.5 + 1e-9) * scale * torch.eye(CHANNELS, dtype=torch.float64))
    torch.testing.assert_close(gaussian.tasks["0"].precision.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gaussian.tasks["0"].mean.double(), x.mean(0), rtol=1e-6, atol=1e-5)


def test_chunking_does_not_change_the_fit_and_extra_channels_are_ignored() -> None:
    """Features may carry pooled global channels after the patch channels."""
    train = _features()
    one = PositionGaussian(GRID, CHANNELS, shrinkage=0.1)
    one.fit("0", [train])
    many = PositionGaussian(GRID, CHANNELS, shrinkage=0.1)
    extra = torch.cat([train, torch.randn(len(train), *GRID, 7)], dim=-1)
    many.fit("0", [extra[:5], extra[5:23], extra[23:]])
    torch.testing.assert_close(many.tasks["0"].mean, one.tasks["0"].mean)
    torch.testing.assert_close(many.tasks["0"].precision, one.tasks["0"].precision, rtol=1e-5, atol=1e-5)
    test = _features(2, seed=4)
    extra_test = torch.cat([test, torch.randn(2, *GRID, 7)], dim=-1)
    torch.testing.assert_close(many("0", extra_test), one("0", test), rtol=1e-5, atol=1e-5)
