"""Whitening, FiLM and v1/v2 instance-norm input adapters and their factory."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from anomalib_moleflow.models.moleflow import MoLEFlowModel
from anomalib_moleflow.models.moleflow.config import ExpertConfig, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.experts import (
    FiLMAdapter,
    InstanceNormMLPAdapter,
    WhiteningAdapter,
    build_input_adapter,
)
from anomalib_moleflow.models.moleflow.experts.input_adapters import instance_norm

CHANNELS = 152  # patch channels of the tiny model


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
    film_cfg = MoLEFlowConfig.from_dict({"input_adapter": "film"}).experts
    reference = (torch.full((6,), 2.0), torch.full((6,), 3.0))
    film = build_input_adapter(film_cfg, 6, 1, reference)
    assert film.has_reference and torch.equal(film.reference_mean, reference[0]) and torch.equal(film.reference_std, reference[1])
    assert not build_input_adapter(film_cfg, 6, 0, reference).has_reference  # task 0 is the reference itself
    assert not build_input_adapter(film_cfg, 6, 1).has_reference


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


def _reference(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linspace(-1.0, 1.0, channels), torch.linspace(0.5, 2.0, channels)


def test_film_later_task_is_the_full_film_transform_of_the_mapped_features() -> None:
    mean, std = _reference(8)
    adapter = FiLMAdapter(8, task_index=1, reference=(mean, std))
    torch.nn.init.normal_(adapter.mlp[-1].weight)
    x = torch.randn(2, 2, 2, 8)
    y = adapter.film_gamma * (torch.nn.functional.layer_norm(x, (8,)) * std + mean) + adapter.film_beta
    torch.testing.assert_close(adapter(x), y + 0.5 * adapter.mlp(y))
    assert adapter.regularization().item() == 0.0


def test_film_starts_as_the_notes_state() -> None:
    """Identity FiLM (gamma 1, beta 0), gate 0.5, MLP hidden max(C // 2, 128); a fresh later task
    with a reference is the normalised features mapped onto it; task 0 is 90 % identity."""
    mean, std = _reference(8)
    task0, task1 = FiLMAdapter(8, 0), FiLMAdapter(8, 1, reference=(mean, std))
    assert torch.equal(task1.film_gamma, torch.ones(8)) and torch.equal(task1.film_beta, torch.zeros(8))
    assert task1.residual_gate.item() == 0.5 and task1.mlp[0].out_features == 128
    assert FiLMAdapter(300, 1).mlp[0].out_features == 150
    assert not task0.has_reference and task1.has_reference
    x = torch.randn(2, 3, 3, 8) * 4 + 1
    normed = torch.nn.functional.layer_norm(x, (8,))
    torch.testing.assert_close(task1(x), normed * std + mean)
    torch.testing.assert_close(task0(x), 0.9 * x + 0.1 * normed)
    with pytest.raises(ValueError, match="task 0 has no reference"):
        FiLMAdapter(8, 0, reference=(mean, std))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        FiLMAdapter(8, 1, reference=(torch.zeros(4), torch.ones(4)))


def test_film_without_norm_starts_at_exact_identity_and_differs_from_with_norm() -> None:
    """``use_norm=False``: no LayerNorm, so a fresh adapter (task 0 or later) returns its input; with
    the norm the same adapter rescales every patch, and with a trained MLP both transform."""
    mean, std = _reference(8)
    x = torch.randn(2, 3, 3, 8) * 4 + 1
    plain0, plain1 = FiLMAdapter(8, 0, use_norm=False), FiLMAdapter(8, 1, use_norm=False, reference=(mean, std))
    assert not hasattr(plain0, "layer_norm") and hasattr(FiLMAdapter(8, 0), "layer_norm")
    torch.testing.assert_close(plain0(x), x)
    torch.testing.assert_close(plain1(x), x)  # the reference only maps normalised features
    normed = FiLMAdapter(8, 1, reference=(mean, std))
    assert not torch.allclose(normed(x), x, atol=1e-2)
    torch.nn.init.normal_(plain1.mlp[-1].weight)
    torch.testing.assert_close(plain1(x), x + 0.5 * plain1.mlp(x))
    # the norm makes the output blind to a patch's scale; without it the scale passes through
    torch.testing.assert_close(normed(3 * x), normed(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain1(3 * x), plain1(x))


def test_film_fits_its_input_statistics_and_loads_older_states() -> None:
    adapter = FiLMAdapter(4, 0)
    x = torch.randn(3, 5, 5, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + torch.tensor([0.0, 1.0, -1.0, 5.0])
    adapter.fit_input_statistics([x[:1], x[1:]])
    flat = x.reshape(-1, 4)
    torch.testing.assert_close(adapter.input_mean, flat.mean(0))
    torch.testing.assert_close(adapter.input_std, flat.std(0, unbiased=False), atol=1e-5, rtol=1e-5)
    old = {k: v for k, v in FiLMAdapter(4, 1, reference=_reference(4)).state_dict().items() if "reference" not in k and "input_" not in k}
    loaded = FiLMAdapter(4, 1, reference=_reference(4))
    loaded.load_state_dict(old)  # a state written before the reference: mean 0, std 1 (no mapping)
    assert torch.equal(loaded.reference_mean, torch.zeros(4)) and torch.equal(loaded.reference_std, torch.ones(4))


def test_film_in_the_model_takes_task0s_statistics_as_reference(tiny_features: torch.Tensor) -> None:
    """Later tasks' FiLM adapters map onto task 0's fitted patch statistics; the stacked experts agree."""
    torch.manual_seed(0)
    model = MoLEFlowModel(tiny_config(**{"experts.input_adapter": "film", "routing.router": "prototype", "scoring.patch_memory_size": 0}))
    model.add_task()
    model.eval()
    model.fit_task_statistics("0", [tiny_features])
    patches = tiny_features[..., :CHANNELS].reshape(-1, CHANNELS)
    first = model.input_adapters["0"]
    torch.testing.assert_close(first.input_mean, patches.mean(0))
    model.add_task()
    later = model.input_adapters["1"]
    assert later.has_reference and torch.equal(later.reference_mean, first.input_mean)
    assert torch.equal(later.reference_std, first.input_std)
    model.fit_task_statistics("1", [tiny_features])
    assert torch.equal(later.input_mean, torch.zeros(CHANNELS))  # only task 0 is a reference
    x = tiny_features[..., :CHANNELS]
    route = torch.tensor([0, 1, 1, 0])[: len(x)]
    with torch.no_grad():
        stacked = model.stacked_experts()._adapter(x, route)
        loop = torch.stack([model.input_adapters[str(int(k))](x[i : i + 1])[0] for i, k in enumerate(route)])
    torch.testing.assert_close(stacked, loop)
    off = MoLEFlowModel(tiny_config(**{"experts.input_adapter": "film", "experts.film_reference": False}))
    off.add_task()
    off.add_task()
    assert not off.input_adapters["1"].has_reference  # no reference: 90 % identity, as the notes' adapter without one


def test_film_without_norm_in_the_model_and_its_stacked_copy(tiny_features: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = MoLEFlowModel(tiny_config(**{"experts.input_adapter": "film", "experts.film_use_norm": False, "routing.router": "prototype"}))
    model.add_task()
    model.add_task()
    for key in model.task_keys:
        torch.nn.init.normal_(model.input_adapters[key].mlp[-1].weight, std=0.01)
    x = tiny_features[..., :CHANNELS]
    route = torch.tensor([1, 0, 1, 0])[: len(x)]
    with torch.no_grad():
        stacked = model.stacked_experts()._adapter(x, route)
        loop = torch.stack([model.input_adapters[str(int(k))](x[i : i + 1])[0] for i, k in enumerate(route)])
    torch.testing.assert_close(stacked, loop)


# ----------------------------------------------------------------------------- v1/v2 adapter
def test_instance_norm_normalises_each_channel_of_each_image_over_the_grid() -> None:
    x = torch.randn(2, 4, 5, 3) * torch.tensor([1.0, 5.0, 0.2]) + torch.tensor([3.0, -2.0, 0.5])
    y = instance_norm(x)
    assert torch.allclose(y.mean(dim=(1, 2)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(y.var(dim=(1, 2), unbiased=False), torch.ones(2, 3), atol=1e-3)
    reference = torch.nn.functional.instance_norm(x.permute(0, 3, 1, 2), eps=1e-5).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, reference)


def test_v1_adapter_starts_as_the_instance_norm_and_its_zero_branch_gets_no_gradient() -> None:
    adapter = InstanceNormMLPAdapter(16)
    assert adapter.mlp[0].out_features == 4  # channels // 4, the width v3 grew from
    x = torch.randn(2, 3, 3, 16) * 4 + 1
    y = adapter(x)
    torch.testing.assert_close(y, instance_norm(x))
    assert adapter.regularization().item() == 0.0
    y.square().sum().backward()
    # gate 0 and a zero output layer: neither moves (the notes' "barely used" residual MLP)
    assert adapter.residual_gate.grad.abs().item() == 0.0
    assert adapter.mlp[-1].weight.grad.abs().sum().item() == 0.0


def test_v1_adapter_with_an_open_gate_adds_its_mlp() -> None:
    adapter = InstanceNormMLPAdapter(8)
    with torch.no_grad():
        torch.nn.init.normal_(adapter.mlp[-1].weight)
        adapter.residual_gate.fill_(0.25)
    x = torch.randn(1, 2, 3, 8)
    normed = instance_norm(x)
    torch.testing.assert_close(adapter(x), normed + 0.25 * adapter.mlp(normed))
    assert not torch.allclose(adapter(x), normed)


def test_factory_gives_the_v1_adapter_to_later_tasks_only() -> None:
    cfg = MoLEFlowConfig.from_dict({"experts": {"input_adapter": "instance_norm_mlp"}}).experts
    assert build_input_adapter(cfg, 8, 0) is None  # v1/v2: task 0 has no input adapter
    assert isinstance(build_input_adapter(cfg, 8, 1), InstanceNormMLPAdapter)
    assert isinstance(build_input_adapter(cfg, 8, 3), InstanceNormMLPAdapter)


def test_in_the_model_only_later_tasks_get_the_v1_adapter(tiny_features: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = MoLEFlowModel(tiny_config(**{"experts.input_adapter": "instance_norm_mlp"}))
    model.add_task()
    model.add_task()
    assert list(model.input_adapters) == ["1"]
    patches = tiny_features[..., :CHANNELS]
    with torch.no_grad():  # both experts fresh: expert 1 is expert 0 on instance-normalised features
        z1, log_det1 = model.flow_forward(tiny_features, "1")
        z0, log_det0 = model.flow_forward(instance_norm(patches), "0")
    torch.testing.assert_close(z1, z0)
    torch.testing.assert_close(log_det1, log_det0)
    adapter = {id(p) for p in model.input_adapters["1"].parameters()}
    assert adapter <= {id(p) for p in model.expert_parameters("1")}
    assert not adapter & {id(p) for p in model.expert_parameters("0")}
