"""Whitening and FiLM input adapters and their factory."""

from __future__ import annotations

import pytest
import torch

from anomalib_moleflow.models.moleflow.config import ExpertConfig, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.experts import (
    FiLMAdapter,
    WhiteningAdapter,
    build_input_adapter,
)


def test_task0_whitening_starts_at_identity_dewhitening() -> None:
    adapter = WhiteningAdapter(8, task_index=0)
    assert torch.allclose(adapter.gamma, torch.ones(8), atol=1e-6)
    assert torch.equal(adapter.beta, torch.zeros(8))
    x = torch.randn(2, 3, 3, 8) * 5 + 3
    y = adapter(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 3, 3), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 3, 3), atol=1e-3)
    assert adapter.regularization().item() < 1e-10


def test_gamma_and_beta_stay_in_their_ranges() -> None:
    adapter = WhiteningAdapter(4, task_index=1, gamma_range=(0.5, 2.0), beta_max=2.0)
    with torch.no_grad():
        adapter.gamma_raw.copy_(torch.tensor([-100.0, 100.0, 0.0, 3.0]))
        adapter.beta_raw.copy_(torch.tensor([-100.0, 100.0, 0.0, 1.0]))
    assert adapter.gamma.min() >= 0.5 and adapter.gamma.max() <= 2.0
    assert adapter.beta.min() >= -2.0 and adapter.beta.max() <= 2.0
    assert adapter.regularization().item() == 0.0  # only task 0 is pulled to identity


def test_later_task_starts_at_midpoint() -> None:
    adapter = WhiteningAdapter(4, task_index=3)
    assert torch.allclose(adapter.gamma, torch.full((4,), 1.25))


def test_film_task0_is_mostly_identity() -> None:
    x = torch.randn(2, 2, 2, 8)
    y = FiLMAdapter(8, task_index=0)(x)
    normed = torch.nn.functional.layer_norm(x, (8,))
    assert torch.allclose(y, 0.9 * x + 0.1 * normed, atol=1e-6)


def test_factory_kinds() -> None:
    def experts(kind: str) -> ExpertConfig:
        return MoLEFlowConfig.from_dict({"experts": {"input_adapter": kind}}).experts

    assert isinstance(build_input_adapter(experts("whitening"), 4, 0), WhiteningAdapter)
    assert isinstance(build_input_adapter(experts("film"), 4, 0), FiLMAdapter)
    assert build_input_adapter(experts("none"), 4, 0) is None


def test_factory_passes_the_whitening_settings_and_the_task_index() -> None:
    cfg = MoLEFlowConfig.from_dict({
        "experts": {"whitening_gamma_range": (0.25, 4.0), "whitening_beta_max": 3.0, "whitening_identity_reg": 0.5}
    }).experts
    task0 = build_input_adapter(cfg, 6, 0)
    assert (task0.gamma_min, task0.gamma_max, task0.beta_max) == (0.25, 4.0, 3.0)
    assert task0.identity_reg_weight == 0.5
    assert torch.allclose(task0.gamma, torch.ones(6), atol=1e-6)  # gamma = 1 for any range
    task2 = build_input_adapter(cfg, 6, 2)
    assert task2.identity_reg_weight == 0.0
    assert torch.allclose(task2.gamma, torch.full((6,), 0.25 + 3.75 / 2))  # the range's midpoint
    film = build_input_adapter(MoLEFlowConfig.from_dict({"input_adapter": "film"}).experts, 6, 1)
    assert film.has_reference


def test_task0_regulariser_pulls_toward_identity() -> None:
    adapter = WhiteningAdapter(4, task_index=0, identity_reg=0.1)
    with torch.no_grad():
        adapter.gamma_raw.add_(1.0)
        adapter.beta_raw.fill_(0.5)
    expected = 0.1 * (((adapter.gamma - 1) ** 2).mean() + (adapter.beta**2).mean())
    assert adapter.regularization().item() == pytest.approx(expected.item())
    assert adapter.regularization().item() > 0
    adapter.regularization().backward()
    assert adapter.gamma_raw.grad is not None and adapter.beta_raw.grad.abs().sum() > 0


def test_film_later_task_is_the_full_film_transform() -> None:
    adapter = FiLMAdapter(8, task_index=1)
    torch.nn.init.normal_(adapter.mlp[-1].weight)
    x = torch.randn(2, 2, 2, 8)
    y = adapter.film_gamma * torch.nn.functional.layer_norm(x, (8,)) + adapter.film_beta
    torch.testing.assert_close(adapter(x), y + 0.5 * adapter.mlp(y))
    assert adapter.regularization().item() == 0.0
