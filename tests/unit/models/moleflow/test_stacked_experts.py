"""Experts stacked along a task axis: a batch mixing three products scores in one pass as the
per-expert loop scores it (routes, image scores and maps), for every router and expert kind."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import tiny_config

from anomalib_moleflow.models.moleflow import MoLEFlowModel, RoutedInferenceBatch
from anomalib_moleflow.models.moleflow.stacked_experts import (
    StackedExperts,
    gathered_linear,
)

STYLES = ("red_stripes", "blue_checker", "green_dots")


@pytest.fixture(scope="module")
def products(tiny_extractor_model: MoLEFlowModel, product_images: Callable[..., Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per product: training features (6 images) and test features (2 good, 2 defective)."""
    out = {}
    with torch.no_grad():
        for index, style in enumerate(STYLES):
            good, _ = product_images(style, 8, seed=20 + index)
            defective, _ = product_images(style, 2, seed=40 + index, defect=True)
            extract = tiny_extractor_model.extract_features
            out[style] = (extract(good[:6]), extract(torch.cat([good[6:], defective])))
    return out


def _three_products(products: dict[str, tuple[torch.Tensor, torch.Tensor]], **overrides: Any) -> MoLEFlowModel:
    """A tiny model with three distinct (perturbed) experts, statistics and thresholds fitted."""
    torch.manual_seed(0)
    model = MoLEFlowModel(tiny_config(**overrides), normalize_scores=True)
    for style in STYLES:
        key = model.add_task(style)
        for param in model.expert_parameters(key):
            param.data.add_(0.05 * torch.randn_like(param))
    model.eval()
    with torch.no_grad():
        for key, style in zip(model.task_keys, STYLES, strict=True):
            train, test = products[style]
            model.fit_task_statistics(key, [train[:3], train[3:]])
            with model.oracle(key), model.raw_scores():
                raw = model.predict_features(test)
            model.fit_task_thresholds(key, raw.pred_score, raw.anomaly_map[:, 0], torch.tensor([0, 0, 1, 1]), None)
    return model


def _mixed(products: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The 12 test images, products interleaved."""
    return torch.stack([products[style][1][i] for i in range(4) for style in STYLES])


def _both_paths(model: MoLEFlowModel, features: torch.Tensor) -> tuple[RoutedInferenceBatch, RoutedInferenceBatch]:
    with torch.no_grad():
        model.stacked_routing = False
        loop = model.predict_features(features)
        model.stacked_routing = True
        stacked = model.predict_features(features)
    model.stacked_routing = False
    return loop, stacked


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # memory router, whitening adapters, DIA, every statistic
        {"routing.router": "hybrid"},
        {"routing.router": "prototype", "routing.prototype_metric": "mahalanobis"},
        {"experts.input_adapter": "film", "experts.use_dia": False, "scoring.patch_memory_size": 0, "routing.router": "prototype"},
        {"routing.unknown_threshold": 1.0},
        {"routing.router_patch_quantile": 0.25, "routing.unknown_threshold": 1.0},
        {"routing.router": "prototype", "routing.unknown_threshold": 10.0},
        {"experts.lora_kind": "spatial_contextual", "flow.use_cpcf": True, "routing.router": "hybrid"},
        {"experts.lora_kind": "spatial_contextual", "experts.lora_on_task0": False, "flow.use_cpcf": True, "flow.cpcf_use_attention": True},
        {
            "experts.input_adapter": "instance_norm_mlp",  # v1/v2: task 0 has no adapter
            "flow.use_ms_context": True,
            "flow.ms_context_kind": "task_conditioned",
            "flow.use_patch_attention": True,
            "flow.patch_attention_hidden": 16,
            "flow.use_neighborhood_context": True,
        },
    ],
    ids=[
        "memory", "hybrid", "prototype", "film-no-dia-no-memory", "memory-unknown", "memory-quartile-unknown", "prototype-unknown", "sc-lora-cpcf-hybrid",
        "sc-lora-cpcf-attention", "v1-adapter-task-ms-context-attention-fixed-context",
    ],  # fmt: skip
)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_a_mixed_batch_scores_as_the_per_expert_loop(
    products: dict[str, tuple[torch.Tensor, torch.Tensor]], overrides: dict[str, Any], normalize: bool
) -> None:
    model = _three_products(products, **overrides)
    model._normalize = normalize
    loop, stacked = _both_paths(model, _mixed(products))
    assert torch.equal(stacked.pred_task, loop.pred_task)
    assert len(set(loop.pred_task.tolist()) - {-1}) >= 2  # the batch really is routed to several experts
    assert torch.allclose(stacked.pred_score, loop.pred_score, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.allclose(stacked.anomaly_map, loop.anomaly_map, rtol=1e-5, atol=1e-5, equal_nan=True)
    if "routing.unknown_threshold" in overrides:
        assert (loop.pred_task == -1).any()  # the flag path is exercised


def test_stacked_copy_follows_changes_and_stays_out_of_state_and_pickle(products: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    model = _three_products(products)
    keys = set(model.state_dict())
    first = model.stacked_experts()
    assert model.stacked_experts() is first  # built once
    assert set(model.state_dict()) == keys and not any(isinstance(m, StackedExperts) for m in model.modules())
    with torch.no_grad():
        model.dia["1"].inn.module_list[0].s_net[4].bias.add_(0.1)  # a weight of one expert changes
    second = model.stacked_experts()
    assert second is not first
    assert not torch.equal(second.dia_0_s_net_bias_4[1], first.dia_0_s_net_bias_4[1])
    assert torch.equal(second.dia_0_s_net_bias_4[0], first.dia_0_s_net_bias_4[0])
    assert "_stacked_cache" not in pickle.loads(pickle.dumps(model)).__dict__
    loop, stacked = _both_paths(model, _mixed(products))
    assert torch.allclose(stacked.pred_score, loop.pred_score, rtol=1e-5, atol=1e-5)


def test_training_path_is_untouched(products: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The stacked pass leaves no routed weights behind: training runs the active expert as before."""
    model = _three_products(products)
    features = products["red_stripes"][0][:2]
    with torch.no_grad():
        before = model.flow_forward(features, "2")
        model.stacked_experts().predict(model, _mixed(products), normalize=True)
        after = model.flow_forward(features, "2")
    assert all(layer.routed is None for layer in model.flow.lora_layers())
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_gathered_linear_picks_each_images_task() -> None:
    weight, bias = torch.randn(3, 4, 5), torch.randn(3, 4)
    x, route = torch.randn(2, 6, 5), torch.tensor([2, 0])
    out = gathered_linear(x, weight, bias, route)
    for image, task in enumerate(route.tolist()):
        assert torch.allclose(out[image], torch.nn.functional.linear(x[image], weight[task], bias[task]), atol=1e-6)


def test_a_model_without_experts_is_refused(tiny_extractor_model: MoLEFlowModel) -> None:
    with pytest.raises(ValueError, match="at least one task expert"):
        StackedExperts(tiny_extractor_model)
