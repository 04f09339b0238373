"""Gaussian maths of the router and the scoring statistics: pooling, Ledoit-Wolf shrinkage (against
scikit-learn's), fitting in float64, and Mahalanobis distances."""

from __future__ import annotations

import pytest
import torch
from sklearn.covariance import ledoit_wolf

from anomalib_moleflow.models.moleflow.gaussian import (
    fit_gaussian,
    ledoit_wolf_covariance,
    mahalanobis,
    pool_features,
    precision_of,
)


def _anisotropic(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """``(n, c)`` float64 samples whose channel scales range from 0.1 to 3, with a non-zero mean."""
    generator = torch.Generator().manual_seed(seed)
    return 2.0 + torch.randn(n, c, dtype=torch.float64, generator=generator) * torch.linspace(0.1, 3.0, c, dtype=torch.float64)


def test_pool_features_averages_the_grid() -> None:
    features = torch.randn(2, 3, 4, 5)
    assert torch.allclose(pool_features(features), features.reshape(2, 12, 5).mean(1))
    with pytest.raises(ValueError, match=r"B, H, W, C"):
        pool_features(torch.randn(2, 5))


@pytest.mark.parametrize(("n", "c"), [(10, 40), (200, 8), (50, 50)])
def test_ledoit_wolf_equals_scikit_learn(n: int, c: int) -> None:
    x = _anisotropic(n, c)
    centred = x - x.mean(0)
    ours = ledoit_wolf_covariance(centred)
    reference, _ = ledoit_wolf(centred.numpy(), assume_centered=True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, torch.from_numpy(reference), rtol=1e-10, atol=1e-12)


def test_ledoit_wolf_is_positive_definite_with_fewer_samples_than_channels() -> None:
    x = torch.randn(10, 40, dtype=torch.float64)
    cov = ledoit_wolf_covariance(x - x.mean(0))
    assert torch.linalg.eigvalsh(cov).min() > 0
    plain = (x - x.mean(0)).T @ (x - x.mean(0)) / 10
    assert torch.linalg.eigvalsh(plain).min() < 1e-10  # where the sample covariance is singular


def test_ledoit_wolf_of_isotropic_zero_variance_data_is_zero() -> None:
    cov = ledoit_wolf_covariance(torch.zeros(5, 3, dtype=torch.float64))
    assert torch.equal(cov, torch.zeros(3, 3, dtype=torch.float64))


def test_precision_of_inverts_the_loaded_covariance_in_place() -> None:
    x = _anisotropic(30, 6)
    cov = torch.cov(x.T)
    loaded = cov + 0.5 * torch.eye(6, dtype=torch.float64)
    precision = precision_of(cov, 0.5)
    torch.testing.assert_close(precision, torch.linalg.inv(loaded), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cov, loaded)  # the diagonal load is added to the argument itself


def test_fit_gaussian_is_mean_and_inverse_shrunk_covariance_plus_ridge() -> None:
    x = _anisotropic(40, 12).float()
    mean, precision = fit_gaussian(x, ridge=1e-3)
    assert mean.dtype == precision.dtype == torch.float64
    x64 = x.double()
    torch.testing.assert_close(mean, x64.mean(0))
    cov = ledoit_wolf_covariance(x64 - x64.mean(0))
    mu = cov.diagonal().mean()
    expected = torch.linalg.inv(cov + 1e-3 * mu * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(precision, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(precision, precision.T)


@pytest.mark.parametrize("x", [torch.ones(1, 4), torch.full((6, 4), 3.0)], ids=["one sample", "identical samples"])
def test_fit_gaussian_without_variance_falls_back_to_euclidean(x: torch.Tensor) -> None:
    mean, precision = fit_gaussian(x, ridge=1e-5)
    assert torch.equal(mean, x[0].double())
    assert torch.equal(precision, torch.eye(4, dtype=torch.float64))
    probe = torch.tensor([[x[0, 0].item() + 3.0, x[0, 1].item() + 4.0, x[0, 2].item(), x[0, 3].item()]])
    assert mahalanobis(probe, mean, precision).item() == pytest.approx(5.0)


def test_fit_gaussian_is_scale_invariant() -> None:
    """The ridge is relative to the mean variance: scaling the data scales every distance alike."""
    x = _anisotropic(30, 8)
    probe = _anisotropic(5, 8, seed=1)
    small = mahalanobis(probe, *fit_gaussian(x, ridge=1e-2))
    large = mahalanobis(1000.0 * probe, *fit_gaussian(1000.0 * x, ridge=1e-2))
    torch.testing.assert_close(large, small, rtol=1e-8, atol=1e-8)


def test_mahalanobis_matches_the_explicit_formula() -> None:
    x = _anisotropic(20, 5)
    mean, precision = fit_gaussian(x, ridge=1e-5)
    probe = _anisotropic(7, 5, seed=3).float()
    expected = torch.stack([torch.sqrt((p.double() - mean) @ precision @ (p.double() - mean)) for p in probe])
    distances = mahalanobis(probe, mean.float(), precision.float())
    assert distances.dtype == torch.float64 and distances.shape == (7,)
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-6)
    assert mahalanobis(mean[None], mean, precision).item() == 0.0


def test_mahalanobis_clamps_round_off_below_zero() -> None:
    """A precision that is not positive definite cannot give a NaN distance."""
    negative = -torch.eye(3, dtype=torch.float64)
    distances = mahalanobis(torch.ones(2, 3), torch.zeros(3), negative)
    assert torch.equal(distances, torch.zeros(2, dtype=torch.float64))
