"""Whitening and FiLM input adapters."""

import torch

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.input_adapters import FiLMAdapter, WhiteningAdapter, build_input_adapter


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
    cfg = MoLEFlowConfig()
    assert isinstance(build_input_adapter("whitening", 4, 0, cfg), WhiteningAdapter)
    assert isinstance(build_input_adapter("film", 4, 0, cfg), FiLMAdapter)
    assert build_input_adapter("none", 4, 0, cfg) is None
