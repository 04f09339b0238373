"""Global-score fusion: per-task Gaussian of pooled features, z-normalised and added to the flow score."""

import pytest
import torch

from anomalib_moleflow.models.moleflow.global_score import GlobalScoreFusion


def _fitted(weight: float = 0.5) -> tuple[GlobalScoreFusion, torch.Tensor, torch.Tensor]:
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
