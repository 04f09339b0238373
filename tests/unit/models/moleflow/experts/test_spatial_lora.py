"""SC-LoRA: bilinear weights over the parameter grid, identity start, position-dependent update,
scaling, per-task separation, each image's own expert in a routed pass, and a tiny model whose
earlier task's grids stay bit-identical while a later task trains."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from anomalib_moleflow.models.moleflow import MoLEFlowConfig, MoLEFlowModel
from anomalib_moleflow.models.moleflow.experts import LoRALinear
from anomalib_moleflow.models.moleflow.experts.spatial_lora import SpatialLoRALinear, bilinear_grid_weights
from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss


def _layer(grid: int = 3, patch_grid: tuple[int, int] = (4, 3), keys: str = "0", **kwargs: object) -> SpatialLoRALinear:
    """A 6 -> 5 SC-LoRA layer with rank 2, experts ``keys`` added and given random B grids and biases."""
    torch.manual_seed(0)
    layer = SpatialLoRALinear(6, 5, rank=2, grid_size=grid, **kwargs)
    for key in keys:
        layer.add_adapter(key)
        torch.nn.init.normal_(layer.lora_B[key], std=0.5)
        torch.nn.init.normal_(layer.task_bias[key], std=0.5)
    layer.patch_grid = patch_grid
    return layer


@pytest.mark.parametrize(("height", "width", "grid"), [(8, 6, 4), (1, 3, 4), (2, 2, 4), (5, 7, 2), (3, 3, 1)])
def test_grid_weights_are_bilinear_interpolation(height: int, width: int, grid: int) -> None:
    values = torch.randn(grid, grid, dtype=torch.float64)
    weights = bilinear_grid_weights(height, width, grid, dtype=torch.float64)
    expected = F.interpolate(values[None, None], size=(height, width), mode="bilinear", align_corners=False)
    torch.testing.assert_close(weights @ values.reshape(-1), expected.reshape(-1))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(height * width, dtype=torch.float64))
    assert (weights >= 0).all() and ((weights > 0).sum(dim=1) <= 4).all()


def test_new_adapter_is_identity_and_trained_adapter_is_not() -> None:
    torch.manual_seed(0)
    layer = SpatialLoRALinear(6, 5, rank=2, grid_size=4)
    layer.patch_grid = (3, 3)
    x = torch.randn(2 * 9, 6)
    base = layer(x)
    layer.add_adapter("0")
    layer.set_adapter("0")
    assert torch.all(layer.lora_B["0"] == 0) and layer.lora_A["0"].abs().sum() > 0
    assert torch.equal(layer(x), base)
    torch.nn.init.normal_(layer.lora_B["0"])
    assert not torch.allclose(layer(x), base)
    layer.set_adapter(None)
    assert torch.equal(layer(x), base)


def test_update_is_the_interpolated_pair_at_each_position() -> None:
    layer = _layer(alpha=3.0)
    layer.set_adapter("0")
    x = torch.randn(2 * 12, 6)
    weights = bilinear_grid_weights(4, 3, 3)
    a_grid, b_grid = layer.lora_A["0"].reshape(9, 2, 6), layer.lora_B["0"].reshape(9, 5, 2)
    expected = []
    for row in range(24):
        w = weights[row % 12]
        a = (w[:, None, None] * a_grid).sum(0)
        b = (w[:, None, None] * b_grid).sum(0)
        expected.append(layer.base(x[row]) + 1.5 * (b @ (a @ x[row])) + layer.task_bias["0"])
    assert layer.scaling == 1.5
    torch.testing.assert_close(layer(x), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_the_same_patch_at_two_positions_gets_different_updates() -> None:
    layer = _layer()
    layer.set_adapter("0")
    x = torch.randn(1, 6).expand(12, 6)  # one patch value everywhere on the 4 x 3 grid
    out = layer(x)
    assert not torch.allclose(out[0], out[-1], atol=1e-4)  # opposite corners
    standard = LoRALinear(6, 5, rank=2)
    standard.add_adapter("0")
    standard.set_adapter("0")
    torch.nn.init.normal_(standard.lora_B["0"].weight)
    assert torch.allclose(standard(x)[0], standard(x)[-1])


def test_a_one_cell_grid_is_the_standard_lora() -> None:
    spatial = _layer(grid=1)
    spatial.set_adapter("0")
    standard = LoRALinear(6, 5, rank=2)
    standard.base.load_state_dict(spatial.base.state_dict())
    standard.add_adapter("0")
    standard.set_adapter("0")
    with torch.no_grad():
        standard.lora_A["0"].weight.copy_(spatial.lora_A["0"][0, 0])
        standard.lora_B["0"].weight.copy_(spatial.lora_B["0"][0, 0])
        standard.task_bias["0"].copy_(spatial.task_bias["0"])
    x = torch.randn(24, 6)
    torch.testing.assert_close(spatial(x), standard(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("rule", "expected"), [("alpha/rank", 0.25), ("alpha/(2*rank)", 0.125)])
def test_scaling_rules_are_the_standard_loras(rule: str, expected: float) -> None:
    assert SpatialLoRALinear(4, 4, rank=4, alpha=1.0, scaling_rule=rule).scaling == expected


def test_adapters_are_separate_and_sized_by_the_grid() -> None:
    layer = _layer(grid=4, keys="01")
    p0, p1 = layer.adapter_parameters("0"), layer.adapter_parameters("1")
    assert {id(p) for p in p0}.isdisjoint({id(p) for p in p1}) and len(p0) == 3  # A grid, B grid, bias
    assert layer.lora_A["0"].shape == (4, 4, 2, 6) and layer.lora_B["0"].shape == (4, 4, 5, 2)
    assert not torch.equal(layer.lora_A["0"][0, 0], layer.lora_A["0"][3, 3])  # each cell drawn on its own
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("0")
    no_lora = SpatialLoRALinear(4, 3, use_lora=False)
    no_lora.add_adapter("0")
    assert "0" not in no_lora.lora_A and len(no_lora.adapter_parameters("0")) == 1
    double = SpatialLoRALinear(4, 3).double()
    double.add_adapter("0")
    assert double.lora_A["0"].dtype == double.lora_B["0"].dtype == torch.float64


def test_bad_grid_size_missing_patch_grid_and_merging_are_refused() -> None:
    with pytest.raises(ValueError, match="grid_size must be >= 1, got 0"):
        SpatialLoRALinear(4, 4, grid_size=0)
    layer = _layer()
    layer.set_adapter("0")
    layer.patch_grid = None
    with pytest.raises(RuntimeError, match="patch_grid must be set"):
        layer(torch.randn(12, 6))
    with pytest.raises(TypeError, match="varies with the patch position"):
        layer.merged_weights("0")


def test_routed_pass_scores_each_images_rows_with_its_own_expert() -> None:
    layer = _layer(keys="01")
    x = torch.randn(3 * 12, 6)  # 3 images of 4 x 3 patches, image-major
    route = torch.tensor([1, 0, 1])
    keys = [str(int(t)) for t in route]
    layer.routed = (
        layer.base.weight.expand(3, -1, -1),
        torch.stack([layer.base.bias + layer.task_bias[k] for k in keys]),
        torch.stack([layer.lora_A[k] for k in keys]),
        torch.stack([layer.lora_B[k] for k in keys]),
    )
    with torch.no_grad():
        got = layer(x)
        layer.routed = None
        for image, key in enumerate(keys):
            layer.set_adapter(key)
            rows = slice(12 * image, 12 * image + 12)
            torch.testing.assert_close(got[rows], layer(x[rows]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:12], got[12:24])


# ----------------------------------------------------------------------------- in the model
SC_CONFIG = {
    "features": {"image_size": 64, "grid_downsample": 1},
    "flow": {"n_coupling_blocks": 2, "subnet_hidden_ratio": 0.5, "use_cpcf": True, "context_kernel": 3},
    "experts": {"lora_rank": 2, "dia_hidden_ratio": 0.25, "lora_kind": "spatial_contextual", "sc_lora_grid_size": 4},
}


def _train(model: MoLEFlowModel, key: str, features: torch.Tensor, steps: int = 3) -> None:
    params = model.prepare_task_training(key)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss_fn = MoLEFlowLoss(tail_weight=model.config.loss.tail_weight, logdet_reg=model.config.loss.logdet_reg)
    model.train()
    for _ in range(steps):
        z, log_jac_det = model.flow_forward(features, key)
        loss = loss_fn(z, log_jac_det)[0] + model.regularization(key)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
    model.eval()


def test_training_a_later_task_leaves_the_earlier_sc_lora_grids_bit_identical(tiny_features: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = MoLEFlowModel(MoLEFlowConfig.from_dict(SC_CONFIG))
    model.add_task()
    layers = model.flow.lora_layers()
    assert layers and all(isinstance(layer, SpatialLoRALinear) and layer.grid_size == 4 for layer in layers)
    _train(model, "0", tiny_features)
    model.add_task()
    grids0 = [p.detach().clone() for layer in layers for p in (layer.lora_A["0"], layer.lora_B["0"])]
    grids1 = [p.detach().clone() for layer in layers for p in (layer.lora_A["1"], layer.lora_B["1"])]
    assert all(torch.all(layer.lora_B["1"] == 0) for layer in layers)  # the new expert starts as the identity
    with torch.no_grad():
        before = model.patch_scores(tiny_features, "0")
    _train(model, "1", tiny_features)
    after0 = [p for layer in layers for p in (layer.lora_A["0"], layer.lora_B["0"])]
    after1 = [p for layer in layers for p in (layer.lora_A["1"], layer.lora_B["1"])]
    assert all(torch.equal(a, b) for a, b in zip(grids0, after0, strict=True))
    assert sum(not torch.equal(a, b) for a, b in zip(grids1, after1, strict=True)) >= len(grids1) // 2
    with torch.no_grad():
        assert torch.equal(model.patch_scores(tiny_features, "0"), before)
        assert not torch.equal(model.patch_scores(tiny_features, "1"), before)


def test_an_sc_lora_model_round_trips_through_its_state_dict_and_pickle(tiny_features: torch.Tensor) -> None:
    torch.manual_seed(0)
    config = MoLEFlowConfig.from_dict(SC_CONFIG)
    model = MoLEFlowModel(config)
    for _ in range(2):
        key = model.add_task()
        for param in model.expert_parameters(key):
            param.data.add_(0.05 * torch.randn_like(param))
    model.eval()
    with torch.no_grad():
        expected = [model.patch_scores(tiny_features, key) for key in ("0", "1")]
    fresh = MoLEFlowModel(config).eval()
    fresh.load_state_dict(model.state_dict())  # creates both experts, then loads their grids
    unpickled = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for key, scores in zip(("0", "1"), expected, strict=True):
            assert torch.equal(fresh.patch_scores(tiny_features, key), scores)
            assert torch.equal(unpickled.patch_scores(tiny_features, key), scores)
    assert any(".lora_A.1" in name for name in model.state_dict())
