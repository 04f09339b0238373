"""Global-score fusion: per-task Gaussian of pooled features, z-normalised and added to the flow score."""

from __future__ import annotations

import pytest
import torch

from anomalib_moleflow.models.moleflow.gaussian import fit_gaussian, mahalanobis
from anomalib_moleflow.models.moleflow.task_statistics import (
    GlobalScoreFusion,
    TaskStatistics,
)


def _fitted(weight: float = 0.5) -> tuple[GlobalScoreFusion, torch.Tensor, torch.Tensor]:
    """Fusion fitted on 64 training images: returns it, their pooled features and flow scores."""
    torch.manual_seed(0)
    fusion = GlobalScoreFusion(channels=6, weight=weight)
    pooled = torch.randn(64, 6)
    flow = torch.randn(64) * 2 + 10
    fusion.fit("0", pooled, flow)
    return fusion, pooled, flow


def test_unfitted_task_passes_flow_scores_through() -> None:
    fusion = GlobalScoreFusion(channels=6, weight=0.5)
    fusion.add_task("0")
    flow = torch.tensor([1.0, 2.0])
    assert torch.equal(fusion("0", flow, torch.randn(2, 6)), flow)


def test_training_scores_are_z_normalised() -> None:
    fusion, pooled, flow = _fitted(weight=1.0)
    z_flow_only = GlobalScoreFusion(6, weight=1e-12)
    z_flow_only.fit("0", pooled, flow)
    z = z_flow_only("0", flow, pooled)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    fused = fusion("0", flow, pooled)
    assert abs(float(fused.mean())) < 1e-4  # both terms have mean zero on the training images


def test_far_global_features_raise_the_score_of_a_normal_looking_image() -> None:
    fusion, pooled, flow = _fitted()
    typical_flow = flow.mean().expand(2)
    near, far = pooled[:1], pooled[:1] + 8.0
    scores = fusion("0", typical_flow, torch.cat([near, far]))
    assert scores[1] > scores[0] + 5


def test_state_dict_round_trip_and_errors() -> None:
    fusion, pooled, flow = _fitted()
    other = GlobalScoreFusion(channels=6, weight=0.5)  # no tasks yet: loading creates them
    other.load_state_dict(fusion.state_dict())
    assert other.fitted("0")
    assert torch.equal(other("0", flow[:4], pooled[:4]), fusion("0", flow[:4], pooled[:4]))
    with pytest.raises(ValueError, match="at least 2 training images"):
        fusion.fit("1", pooled[:1], flow[:1])


def test_global_score_is_the_squared_mahalanobis_distance_and_stats_are_the_training_moments() -> None:
    fusion, pooled, flow = _fitted()
    assert isinstance(fusion, TaskStatistics)
    mean, precision = fit_gaussian(pooled, ridge=1e-5)
    probe = pooled[:5] + 0.5
    expected = mahalanobis(probe, mean, precision).square().float()
    torch.testing.assert_close(fusion.global_score("0", probe), expected, rtol=1e-5, atol=1e-5)
    train_global = fusion.global_score("0", pooled).double()
    stats = fusion.tasks["0"].stats.double()
    torch.testing.assert_close(stats[0], flow.double().mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[1], flow.double().std(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[2], train_global.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[3], train_global.std(), rtol=1e-5, atol=1e-5)
    # the fused score is exactly the formula of the module docstring
    fused = fusion("0", flow[:5], probe)
    s = fusion.tasks["0"].stats
    manual = (flow[:5] - s[0]) / s[1] + 0.5 * (fusion.global_score("0", probe) - s[2]) / s[3]
    torch.testing.assert_close(fused, manual)


def test_constant_training_scores_do_not_divide_by_zero() -> None:
    fusion = GlobalScoreFusion(channels=6, weight=0.5)
    pooled = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    fusion.fit("0", pooled, torch.full((8,), 4.0))
    assert float(fusion.tasks["0"].stats[1]) == pytest.approx(1e-6)
    assert torch.isfinite(fusion("0", torch.tensor([4.0, 5.0]), pooled[:2])).all()


def test_tasks_are_independent() -> None:
    fusion, pooled, flow = _fitted()
    before = fusion("0", flow[:4], pooled[:4])
    fusion.fit("1", pooled + 5.0, flow * 3)
    assert fusion.task_keys == ["0", "1"] and fusion.n_fitted == 2
    assert torch.equal(fusion("0", flow[:4], pooled[:4]), before)
    assert not torch.allclose(fusion("1", flow[:4], pooled[:4]), before)
