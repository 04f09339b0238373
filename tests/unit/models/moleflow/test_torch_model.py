"""MoLE-Flow torch model: outputs, identity start of new experts, what trains when, routing among
experts, per-task normalisation, state dicts, and the core promise of the design: learning a new
task leaves earlier tasks bit-identical.

All tests use the tiny model (EfficientNet-Lite0 at 64 px: an 8 x 8 grid of 152-d patches,
followed by 320 pooled channels for the global score and the router).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import differing_keys, same_bits
from torch import nn

from anomalib_moleflow.models.moleflow import (
    MoLEFlowConfig,
    MoLEFlowModel,
    RoutedInferenceBatch,
)
from anomalib_moleflow.models.moleflow.experts import WhiteningAdapter
from anomalib_moleflow.models.moleflow.experts.dia import SimpleSubnet
from anomalib_moleflow.models.moleflow.flow import LightweightMSContext
from anomalib_moleflow.models.moleflow.gaussian import pool_features
from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss, patch_nll
from anomalib_moleflow.models.moleflow.routing import UNKNOWN, TaskRouter
from anomalib_moleflow.models.moleflow.task_statistics import (
    GlobalScoreFusion,
    PatchMemory,
    PositionGaussian,
    TaskThresholds,
)

GRID = 8
CHANNELS = 152
TOTAL_CHANNELS = 472
ModelFactory = Callable[..., MoLEFlowModel]


@pytest.fixture
def make_model(tiny_config: MoLEFlowConfig) -> ModelFactory:
    """``make_model(normalize_scores=False, **overrides)``: a seeded tiny model (``overrides`` as
    ``"group.field"`` or plain field names) with its first expert added."""

    def factory(normalize_scores: bool = False, **overrides: Any) -> MoLEFlowModel:  # noqa: ANN401
        torch.manual_seed(0)
        model = MoLEFlowModel(tiny_config.updated(overrides), normalize_scores=normalize_scores)
        model.add_task()
        return model

    return factory


@pytest.fixture(scope="module")
def features(tiny_features: torch.Tensor) -> torch.Tensor:
    """Backbone features of 4 random 64 px images ``(4, 8, 8, 472)`` (the backbone is pretrained and
    frozen, so every tiny model computes the same features)."""
    return tiny_features


@pytest.fixture(scope="module")
def two_products(tiny_extractor_model: MoLEFlowModel, product_images: Callable[..., Any]) -> dict[str, torch.Tensor]:
    """Features of two synthetic products: ``train{0,1}`` (6 images each) and ``test`` (3 + 3 unseen
    images, ``labels`` 0 0 0 1 1 1)."""
    out = {}
    for index, style in enumerate(("red_stripes", "blue_checker")):
        images, _ = product_images(style, 9, seed=10 + index)
        feats = tiny_extractor_model.extract_features(images)
        out[f"train{index}"], out[f"test{index}"] = feats[:6], feats[6:]
    out["test"] = torch.cat([out["test0"], out["test1"]])
    out["labels"] = torch.tensor([0, 0, 0, 1, 1, 1])
    return out


def _train(model: MoLEFlowModel, key: str, features: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on ``key`` with the real loss, as ``MoLEFlow.configure_optimizers`` sets up."""
    params = model.prepare_task_training(key)
    cfg = model.config
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = MoLEFlowLoss(tail_weight=cfg.loss.tail_weight, logdet_reg=cfg.loss.logdet_reg)
    model.train()
    for step in range(steps):
        batch = features[step % 2 :: 2] if len(features) > 1 else features
        z, log_jac_det = model.flow_forward(batch, key)
        loss = loss_fn(z, log_jac_det)[0] + model.regularization(key)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
    model.eval()


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    wanted = _ids(params)
    return {name for name, p in model.named_parameters() if id(p) in wanted}


@torch.no_grad()
def _scores(model: MoLEFlowModel, features: torch.Tensor, key: str) -> RoutedInferenceBatch:
    return model.score_features(features, key)


def _two_fitted_experts(make_model: ModelFactory, data: dict[str, torch.Tensor], **overrides: Any) -> MoLEFlowModel:  # noqa: ANN401
    """A tiny model with an expert per product, each with its statistics fitted (routing on)."""
    model = make_model(**overrides)
    model.add_task()
    model.eval()
    for key in ("0", "1"):
        model.fit_task_statistics(key, [data[f"train{key}"][:3], data[f"train{key}"][3:]])
    return model


# ----------------------------------------------------------------------------- outputs
def test_eval_forward_returns_a_routed_inference_batch(make_model: ModelFactory) -> None:
    model = make_model().eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert isinstance(out, RoutedInferenceBatch)
    assert out.pred_score.shape == (3,)
    assert out.anomaly_map.shape == (3, 1, 64, 64)
    assert torch.isfinite(out.pred_score).all()
    assert torch.isfinite(out.anomaly_map).all()
    assert out.pred_label is None and out.pred_mask is None  # left to the post-processor
    assert out.pred_task.dtype == torch.long and out.pred_task.tolist() == [0, 0, 0]  # one expert: no routing
    # the image score is the mean of the top-k (k = 3) patch NLLs of the image (no global score yet)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        patch = model.patch_scores(model.extract_features(images)).flatten(1)
        batch = model(images)
    expected = patch.topk(model.config.scoring.score_top_k, dim=1).values.mean(dim=1)
    assert torch.allclose(batch.pred_score, expected)
    assert (batch.pred_score <= patch.max(dim=1).values).all()


def test_train_forward_returns_latents_and_log_det(make_model: ModelFactory) -> None:
    model = make_model().train()
    z, log_jac_det = model(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, GRID, GRID, CHANNELS)
    assert log_jac_det.shape == (2, GRID, GRID)
    assert torch.isfinite(z).all()
    assert torch.isfinite(log_jac_det).all()
    assert z.requires_grad  # the flow is trainable, the backbone is not
    assert not model.feature_extractor.backbone.training


def test_features_carry_the_global_channels_the_flow_ignores(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model().eval()
    assert model.channels == CHANNELS and features.shape == (4, GRID, GRID, TOTAL_CHANNELS)
    with torch.no_grad():
        full = model.flow_forward(features)
        patch_only = model.flow_forward(features[..., :CHANNELS].contiguous())
    assert torch.equal(full[0], patch_only[0]) and torch.equal(full[1], patch_only[1])


def test_no_expert_raises(tiny_config: MoLEFlowConfig) -> None:
    model = MoLEFlowModel(tiny_config)
    assert model.num_tasks == 0 and model.active_task is None
    with pytest.raises(RuntimeError, match="add_task"):
        model.flow_forward(torch.zeros(1, GRID, GRID, CHANNELS))
    with pytest.raises(KeyError):
        model.set_task("0")
    model.add_task()
    with pytest.raises(KeyError, match="Unknown task expert '7'"):
        model.flow_forward(torch.zeros(1, GRID, GRID, CHANNELS), "7")


def test_add_task_keys_names_and_active_expert(make_model: ModelFactory) -> None:
    model = make_model()
    assert model.task_keys == ["0"]
    assert model.task_names == ["0"]  # the key when no name is given
    assert model.active_task == "0"
    assert model.add_task("cable") == "1"
    assert model.task_keys == ["0", "1"]
    assert model.task_names == ["0", "cable"]
    assert model.num_tasks == 2
    assert model.active_task == "1"
    assert set(model.dia) == {"0", "1"}
    assert set(model.input_adapters) == {"0", "1"}
    # every per-task statistic gets the new (unfitted) task too
    assert [type(m) for m in model.task_statistics] == [TaskRouter, GlobalScoreFusion, PositionGaussian, PatchMemory, TaskThresholds]
    for statistics in model.task_statistics:
        assert statistics.task_keys == ["0", "1"] and statistics.n_fitted == 0
    model.set_task(0)
    assert model.active_task == "0"
    assert all(layer.active_adapter == "0" for layer in model.flow.lora_layers())


def test_optional_parts_follow_the_config(make_model: ModelFactory) -> None:
    bare = make_model(**{
        "routing.router": "none",
        "scoring.global_score_weight": 0.0,
        "scoring.position_gaussian_weight": 0.0,
        "scoring.patch_memory_size": 0,
        "experts.input_adapter": "none",
        "experts.use_dia": False,
        "flow.use_spatial_mixer": False,
    })
    assert bare.router is None and bare.global_score is None and bare.position_gaussian is None and bare.patch_memory is None
    assert bare.spatial_mixer is None and bare.ms_context is None
    assert len(bare.input_adapters) == 0 and len(bare.dia) == 0
    assert [type(m) for m in bare.task_statistics] == [TaskThresholds]
    assert bare.feature_extractor.total_channels == CHANNELS
    assert bare.regularization().item() == 0.0
    v1 = make_model(**{"experts.lora_on_task0": False})  # v1: task 0 is the base flow alone
    v1.add_task()
    assert all("0" not in layer.lora_A and "1" in layer.lora_A for layer in v1.flow.lora_layers())
    ms = make_model(**{"flow.use_ms_context": True, "experts.input_adapter": "film"})
    assert ms.ms_context is not None


def _one_step_loss(model: MoLEFlowModel, key: str, features: torch.Tensor) -> torch.Tensor:
    """Loss of one AdamW step on ``key`` (the real loss), taken after the step's backward pass."""
    params = model.prepare_task_training(key)
    loss_fn = MoLEFlowLoss(tail_weight=model.config.loss.tail_weight, logdet_reg=model.config.loss.logdet_reg)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    z, log_jac_det = model.flow_forward(features, key)
    loss = loss_fn(z, log_jac_det)[0] + model.regularization(key)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    return loss.detach()


def test_forced_ms_context_is_built_with_whitening_and_trains(make_model: ModelFactory, features: torch.Tensor) -> None:
    """``flow.force_ms_context``: the notes' "All V3 (conflict)" configuration, whitening and MS context together."""
    with pytest.warns(UserWarning, match="force_ms_context"):
        model = make_model(**{"flow.use_ms_context": True, "flow.force_ms_context": True})
    assert isinstance(model.input_adapters["0"], WhiteningAdapter)
    assert isinstance(model.ms_context, LightweightMSContext)
    ms_params = _ids(list(model.ms_context.parameters()))
    assert ms_params <= _ids(model.trainable_parameters("0"))
    before = [p.detach().clone() for p in model.ms_context.parameters()]
    loss = _one_step_loss(model, "0", features)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.ms_context.parameters(), strict=True))  # it trained
    assert torch.isfinite(_scores(model, features, "0").pred_score).all()
    with pytest.warns(UserWarning, match="multi-scale context is dropped"):
        assert make_model(**{"flow.use_ms_context": True}).ms_context is None  # without the flag: dropped


def test_without_task_bias_no_bias_parameters_exist_and_a_task_trains(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model(**{"experts.use_task_bias": False})
    model.add_task()
    layers = list(model.flow.lora_layers())
    assert layers and all(len(layer.task_bias) == 0 for layer in layers)
    assert all(set(layer.lora_A) == {"0", "1"} for layer in layers)  # the LoRA experts are still there
    assert not [name for name in model.state_dict() if "task_bias" in name]
    assert "task_bias" not in " ".join(_names(model, model.expert_parameters("1")))
    with_bias = make_model()
    assert [name for name in with_bias.state_dict() if "task_bias" in name]  # the default does have them
    assert sum(p.numel() for p in with_bias.expert_parameters("0")) > sum(p.numel() for p in model.expert_parameters("0"))
    _train(model, "1", features)
    batch = _scores(model, features, "1")
    assert torch.isfinite(batch.pred_score).all() and torch.isfinite(batch.anomaly_map).all()


def test_without_lora_on_task0_task0_trains_the_base_and_task1_gets_lora(make_model: ModelFactory, features: torch.Tensor) -> None:
    """v1: task 0 is the base flow (no LoRA of its own); later tasks get LoRA, and leave task 0 unchanged."""
    model = make_model(**{"experts.lora_on_task0": False})
    layers = list(model.flow.lora_layers())
    assert all(len(layer.lora_A) == 0 and len(layer.lora_B) == 0 for layer in layers)
    task0 = _names(model, model.trainable_parameters("0"))
    assert not [n for n in task0 if "lora_" in n]
    assert _ids(model.shared_parameters()["base"]) <= _ids(model.trainable_parameters("0"))
    base_before = [p.detach().clone() for p in model.shared_parameters()["base"]]
    _train(model, "0", features)
    assert any(not torch.equal(a, p) for a, p in zip(base_before, model.shared_parameters()["base"], strict=True))
    model.add_task()
    assert all(set(layer.lora_A) == {"1"} and set(layer.lora_B) == {"1"} for layer in layers)
    lora1 = [n for n in _names(model, model.trainable_parameters("1")) if "lora_" in n]
    assert len(lora1) == 2 * len(layers)
    before = _scores(model, features, "0")
    _train(model, "1", features, steps=4)
    after = _scores(model, features, "0")
    assert torch.equal(after.pred_score, before.pred_score)
    assert torch.equal(after.anomaly_map, before.anomaly_map)
    assert not torch.equal(_scores(model, features, "1").pred_score, after.pred_score)


def test_flow_forward_through_another_expert_keeps_the_active_one(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model()
    _train(model, "0", features)
    model.add_task()
    assert model.active_task == "1"
    with torch.no_grad():
        via_key = model.flow_forward(features, "0")
        assert model.active_task == "1"
        assert all(layer.active_adapter == "1" for layer in model.flow.lora_layers())
        model.set_task("0")
        active = model.flow_forward(features)
    assert torch.equal(via_key[0], active[0]) and torch.equal(via_key[1], active[1])


# ------------------------------------------------------------------ identity start of an expert
def test_fresh_expert_is_identity_at_init(make_model: ModelFactory) -> None:
    """LoRA B = 0, task biases = 0, and the last layer of every DIA subnet = 0."""
    model = make_model()
    model.add_task()
    for layer in model.flow.lora_layers():
        assert torch.count_nonzero(layer.lora_B["1"].weight) == 0
        assert torch.count_nonzero(layer.task_bias["1"]) == 0
        assert torch.count_nonzero(layer.lora_A["1"].weight) > 0  # A is random, so B gets gradients
    last_layers = [m[-1] for m in model.dia["1"].modules() if isinstance(m, SimpleSubnet)]
    assert len(last_layers) == 2 * model.config.experts.dia_n_blocks
    for layer in last_layers:
        assert torch.count_nonzero(layer.weight) == 0
        assert torch.count_nonzero(layer.bias) == 0


def _base_only_scores(model: MoLEFlowModel, x: torch.Tensor) -> torch.Tensor:
    """Patch NLL of the shared parts alone: spatial mixer and base flow, every expert switched off."""
    x = x[..., : model.channels]  # the pooled global channels after them are not modelled by the flow
    if model.spatial_mixer is not None:
        x = model.spatial_mixer(x)
    model.flow.set_adapter(None)
    try:
        z, log_jac_det = model.flow(x)
    finally:
        model.flow.set_adapter(model.active_task)
    return patch_nll(z, log_jac_det)


def test_fresh_expert_without_input_adapter_equals_base_exactly(make_model: ModelFactory, features: torch.Tensor) -> None:
    """With no input adapter, a new expert (LoRA + task bias + DIA) changes nothing at all."""
    model = make_model(input_adapter="none")
    assert model.config.experts.use_dia and len(model.dia) == 1
    _train(model, "0", features)  # make the shared flow and expert 0 non-trivial
    model.add_task()
    with torch.no_grad():
        expected = _base_only_scores(model, features)
        scores = model.patch_scores(features, "1")
        batch = model.score_features(features, "1")
        z, log_jac_det = model.flow_forward(features, "1")
        dia_z, dia_log_jac_det = model.dia["1"](z)
    assert torch.equal(scores, expected)
    assert torch.equal(batch.pred_score, model.anomaly_map_generator.image_score(expected))
    assert torch.equal(batch.anomaly_map, model.anomaly_map_generator(expected))
    assert torch.equal(dia_z, z)
    assert torch.count_nonzero(dia_log_jac_det) == 0
    # ... while the trained expert 0 does differ from the base
    with torch.no_grad():
        assert not torch.equal(model.patch_scores(features, "0"), expected)


def test_fresh_expert_differs_only_through_its_whitening(make_model: ModelFactory, features: torch.Tensor) -> None:
    """Task > 0 whitening starts at gamma = 1.25, beta = 0 (task 0 at gamma = 1): the only
    non-identity part of a new expert."""
    model = make_model()
    _train(model, "0", features)
    model.add_task()
    adapter0, adapter1 = model.input_adapters["0"], model.input_adapters["1"]
    assert isinstance(adapter1, WhiteningAdapter)
    assert torch.allclose(adapter1.gamma, torch.full((CHANNELS,), 1.25))
    assert torch.equal(adapter1.beta, torch.zeros(CHANNELS))
    assert adapter1.regularization().item() == 0.0  # the identity pull is for task 0 only
    assert torch.allclose(WhiteningAdapter(CHANNELS, task_index=0).gamma, torch.ones(CHANNELS), atol=1e-6)
    with torch.no_grad():
        whitened = adapter1(features[..., : model.channels])
        expected = _base_only_scores(model, whitened)
        scores = model.patch_scores(features, "1")
        layer_norm = torch.nn.functional.layer_norm(features[..., :CHANNELS], (CHANNELS,))
    assert torch.allclose(whitened, 1.25 * layer_norm, atol=1e-5)
    assert torch.equal(scores, expected)
    assert not torch.equal(adapter0.gamma, adapter1.gamma)


# ------------------------------------------------------------------- what trains when
def _groups(model: MoLEFlowModel) -> dict[str, set[int]]:
    shared = model.shared_parameters()
    groups = {name: _ids(params) for name, params in shared.items()}
    for key in model.task_keys:
        groups[f"expert{key}"] = _ids(model.expert_parameters(key))
    return groups


VERSION_MODULES = {
    "experts.input_adapter": "instance_norm_mlp", "flow.use_ms_context": True, "flow.ms_context_kind": "task_conditioned",
    "flow.use_patch_attention": True, "flow.patch_attention_hidden": 16, "flow.use_neighborhood_context": True,
}  # fmt: skip
"""The optional modules of v1/v2, V3, v4.1 and v6 together."""


@pytest.mark.parametrize("overrides", [{}, VERSION_MODULES], ids=["default", "version-modules"])
def test_parameter_groups_partition_the_trainable_model(make_model: ModelFactory, overrides: dict[str, Any]) -> None:
    model = make_model(**overrides)
    model.add_task()
    groups = _groups(model)
    assert all(groups.values()), {k: len(v) for k, v in groups.items()}
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], f"{a} and {b} share parameters"
    covered = set().union(*groups.values())
    backbone = _ids(list(model.feature_extractor.backbone.parameters()))
    rest = {
        name
        for name, p in model.named_parameters()
        if id(p) not in covered and id(p) not in backbone and "w_perm" not in name
    }
    assert not rest, f"parameters in no group (would never train): {sorted(rest)}"


def test_trainable_parameters_default_v41(make_model: ModelFactory) -> None:
    model = make_model()
    model.add_task()
    groups = _groups(model)
    task0 = _ids(model.trainable_parameters("0"))
    assert task0 == groups["expert0"] | groups["base"] | groups["mixer"] | groups["context"]
    assert _ids(model.trainable_parameters("1")) == groups["expert1"]
    assert _names(model, model.trainable_parameters("1")) == _names(model, model.expert_parameters("1"))
    assert all(".1." in n or n.endswith(".1") for n in _names(model, model.trainable_parameters("1")))


@pytest.mark.parametrize(
    ("overrides", "also_trained"),
    [
        ({"freeze_context_after_task0": False}, {"context"}),  # V4
        ({"freeze_mixer_after_task0": False}, {"mixer"}),
        ({"freeze_mixer_after_task0": False, "freeze_context_after_task0": False}, {"mixer", "context"}),  # V3
        ({"freeze_base_after_task0": False}, {"base"}),  # sequential fine-tuning baseline
    ],
)
def test_trainable_parameters_of_earlier_versions(make_model: ModelFactory, overrides: dict[str, bool], also_trained: set[str]) -> None:
    model = make_model(**overrides)
    model.add_task()
    groups = _groups(model)
    expected = groups["expert1"].union(*(groups[g] for g in also_trained))
    assert _ids(model.trainable_parameters("1")) == expected
    task0 = groups["expert0"] | groups["base"] | groups["mixer"] | groups["context"]
    assert _ids(model.trainable_parameters("0")) == task0


def test_prepare_task_training_sets_requires_grad_exactly(make_model: ModelFactory) -> None:
    model = make_model()
    model.add_task()
    for key in ("1", "0", "1"):
        trainable = model.prepare_task_training(key)
        assert model.active_task == key
        wanted = _ids(trainable)
        assert wanted == _ids(model.trainable_parameters(key))
        for name, p in model.named_parameters():
            assert p.requires_grad == (id(p) in wanted), name
        assert not any(p.requires_grad for p in model.feature_extractor.backbone.parameters())


# ------------------------------------------------------------------- no forgetting
def _frozen_state(model: MoLEFlowModel, key: str) -> dict[str, torch.Tensor]:
    """Copy of every tensor state entry (parameters and buffers) except those of expert ``key``."""
    own = _names(model, model.expert_parameters(key))
    return {
        name: t.detach().clone()
        for name, t in model.state_dict(keep_vars=True).items()
        if name not in own and isinstance(t, torch.Tensor)
    }


@pytest.mark.parametrize("overrides", [{}, VERSION_MODULES], ids=["default", "version-modules"])
def test_training_task1_leaves_task0_bit_identical(make_model: ModelFactory, features: torch.Tensor, overrides: dict[str, Any]) -> None:
    model = make_model(**overrides)
    _train(model, "0", features)
    model.fit_task_statistics("0", [features])  # task 0's statistics are frozen state as well
    model.add_task()
    before_state = _frozen_state(model, "1")
    before_scores = _scores(model, features, "0")
    expert1_before = [p.detach().clone() for p in model.expert_parameters("1")]

    _train(model, "1", features, steps=4)

    # expert 1 has learned something ...
    changed = [not torch.equal(a, p) for a, p in zip(expert1_before, model.expert_parameters("1"), strict=True)]
    assert sum(changed) >= len(changed) // 2
    # ... and nothing else moved by a single bit: shared flow, mixer, context, expert 0, buffers
    after_state = model.state_dict()
    for name, value in before_state.items():
        assert same_bits(after_state[name], value), f"{name} changed while training task 1"
    after_scores = _scores(model, features, "0")
    assert torch.equal(after_scores.pred_score, before_scores.pred_score)
    assert torch.equal(after_scores.anomaly_map, before_scores.anomaly_map)
    # and expert 1 now scores differently from expert 0
    assert not torch.equal(_scores(model, features, "1").pred_score, after_scores.pred_score)


def test_fitting_task1_statistics_leaves_task0_bit_identical(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model()
    model.eval()
    model.fit_task_statistics("0", [features[:2]])
    model.add_task()
    before = {k: v for k, v in _frozen_state(model, "1").items() if ".tasks.1." not in k}
    before_scores = _scores(model, features, "0")
    model.fit_task_statistics("1", [features[2:]])
    assert differing_keys({k: v for k, v in model.state_dict().items() if k in before}, before) == []
    after_scores = _scores(model, features, "0")
    assert torch.equal(after_scores.pred_score, before_scores.pred_score)
    assert torch.equal(after_scores.anomaly_map, before_scores.anomaly_map)


def test_task0_unchanged_after_task1_through_the_public_forward(make_model: ModelFactory, features: torch.Tensor) -> None:
    """Same promise seen through ``forward`` with expert 0 active (images, not features)."""
    model = make_model()
    images = torch.rand(2, 3, 64, 64)
    _train(model, "0", model.extract_features(images))
    model.eval()
    with torch.no_grad():
        before = model(images)
    model.add_task()
    _train(model, "1", features)
    model.set_task("0")
    with torch.no_grad():
        after = model(images)
    assert torch.equal(after.pred_score, before.pred_score)
    assert torch.equal(after.anomaly_map, before.anomaly_map)


def test_v4_context_training_does_change_task0(make_model: ModelFactory, features: torch.Tensor) -> None:
    """Sanity check of the tests above: when the shared context keeps training (V4),
    task 0's scores do move, so bit-identity is a real property of V4.1, not an artefact."""
    model = make_model(freeze_context_after_task0=False)
    _train(model, "0", features)
    model.add_task()
    before = _scores(model, features, "0")
    _train(model, "1", features, steps=4)
    after = _scores(model, features, "0")
    assert not torch.equal(after.pred_score, before.pred_score)


# ----------------------------------------------------------------------------- per-task statistics
@torch.no_grad()
def test_fit_task_statistics_fits_router_position_gaussian_and_global_score(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model(**{"scoring.patch_memory_size": 0, "routing.router": "prototype"}).eval()
    key = model.active_task
    flow_only = model.score_features(features, key).pred_score
    chunks = [features[:2], features[2:]]
    model.fit_task_statistics(key, chunks)
    assert model.router.fitted(key) and model.position_gaussian.fitted(key) and model.global_score.fitted(key)
    assert not model.thresholds.fitted(key)  # those need labelled images (fit_task_thresholds)
    reference = TaskRouter(TOTAL_CHANNELS)
    reference.fit(key, pool_features(features))
    assert torch.equal(model.router.tasks[key].mean, reference.tasks[key].mean)
    assert model.router.metric == "mahalanobis" and make_model().router.metric == "euclidean"  # memory router's shortlist
    # the global score reads the pooled deep channels; fused training scores are z-normalised
    fused = model.score_features(features, key).pred_score
    assert not torch.equal(fused, flow_only)
    assert abs(float(fused.mean())) < 1e-3
    expected = model.global_score(key, flow_only, features[:, 0, 0, CHANNELS:])
    torch.testing.assert_close(fused, expected)
    with pytest.raises(ValueError, match="no training features to fit task '0'"):
        model.fit_task_statistics(key, [])


@torch.no_grad()
def test_map_scores_add_the_weighted_position_gaussian_once_fitted(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model(position_gaussian_weight=0.5, patch_memory_size=0, router="prototype")
    key = model.active_task
    model.eval()
    flow_only = model.patch_scores(features, key)
    assert torch.equal(model.map_scores(features, key), flow_only)  # unfitted: the notes' flow NLL
    model.fit_task_statistics(key, [features[:2], features[2:]])
    gaussian = model.position_gaussian(key, features)
    assert float(gaussian.min()) > 0
    torch.testing.assert_close(model.map_scores(features, key), flow_only + 0.5 * gaussian)
    assert torch.equal(model.score_features(features, key).anomaly_map, model.anomaly_map_generator(flow_only + 0.5 * gaussian))
    assert make_model(position_gaussian_weight=0.0).position_gaussian is None


@torch.no_grad()
def test_state_without_position_gaussian_loads_with_the_flow_map(make_model: ModelFactory, features: torch.Tensor) -> None:
    """An anomalib checkpoint saved before the position Gaussian existed loads into today's model."""
    older = make_model(position_gaussian_weight=0.0)
    current = make_model()
    current.load_state_dict(older.state_dict())  # strict: the Gaussian's buffers are absent
    key = current.active_task
    assert not current.position_gaussian.fitted(key)
    older.eval()
    current.eval()
    assert torch.equal(current.score_features(features, key).anomaly_map, older.score_features(features, key).anomaly_map)


@torch.no_grad()
def test_fit_task_thresholds_and_normalised_scores(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model(normalize_scores=True).eval()
    assert model.normalizes_scores
    raw = model.predict_features(features)
    assert not model.thresholds.fitted("0")
    assert float(raw.pred_score.min()) > 1.0  # unfitted: raw scores, not [0, 1]
    labels = torch.tensor([0, 0, 1, 1])
    values = model.fit_task_thresholds("0", raw.pred_score, raw.anomaly_map[:, 0], labels, None)
    assert model.thresholds.fitted("0") and values == pytest.approx(model.thresholds.values("0"))
    normalised = model.predict_features(features)
    expected = model.thresholds.normalize("0", raw.pred_score, raw.anomaly_map)
    assert torch.equal(normalised.pred_score, expected[0])
    assert torch.equal(normalised.anomaly_map, expected[1])
    assert normalised.pred_score.min() >= 0 and normalised.pred_score.max() <= 1
    with model.raw_scores():
        assert not model.normalizes_scores
        assert torch.equal(model.predict_features(features).pred_score, raw.pred_score)
    assert model.normalizes_scores
    plain = make_model()  # the default: raw scores for anomalib's post-processor, fitted or not
    plain.eval()
    plain.thresholds.load_state_dict(model.thresholds.state_dict())
    assert torch.equal(plain.predict_features(features).pred_score, raw.pred_score)


# ----------------------------------------------------------------------------- routing
@torch.no_grad()
def test_routing_among_experts_once_two_prototypes_are_fitted(make_model: ModelFactory, two_products: dict[str, torch.Tensor]) -> None:
    model = make_model()
    model.add_task()
    model.eval()
    model.fit_task_statistics("0", [two_products["train0"]])
    assert not model.routing_active  # one fitted prototype: the active expert scores
    assert model.predict_features(two_products["test"]).pred_task.tolist() == [1] * 6
    model.fit_task_statistics("1", [two_products["train1"]])
    assert model.routing_active
    test = two_products["test"]
    out = model.predict_features(test)
    assert torch.equal(out.pred_task, two_products["labels"])
    assert torch.equal(model.route(test), out.pred_task)
    for index, key in enumerate(model.task_keys):
        rows = out.pred_task == index
        expected = model.score_features(test[rows], key)
        assert torch.equal(out.pred_score[rows], expected.pred_score)
        assert torch.equal(out.anomaly_map[rows], expected.anomaly_map)
    assert model.active_task == "1"  # routing does not change the expert that trains


@torch.no_grad()
def test_oracle_scores_with_the_given_expert(make_model: ModelFactory, two_products: dict[str, torch.Tensor]) -> None:
    model = _two_fitted_experts(make_model, two_products)
    test = two_products["test"]
    with model.oracle("0"):
        assert not model.routing_active
        out = model.predict_features(test)
        with model.oracle(1):
            assert model.predict_features(test).pred_task.tolist() == [1] * 6
        assert model.predict_features(test).pred_task.tolist() == [0] * 6  # the outer oracle again
    assert model.routing_active
    assert out.pred_task.tolist() == [0] * 6
    expected = model.score_features(test, "0")
    assert torch.equal(out.pred_score, expected.pred_score)
    assert torch.equal(out.anomaly_map, expected.anomaly_map)
    with pytest.raises(KeyError, match="Unknown task expert '5'"), model.oracle("5"):
        pass
    assert model.routing_active


@torch.no_grad()
def test_unknown_products_are_flagged_and_scored_fully_anomalous(make_model: ModelFactory, two_products: dict[str, torch.Tensor]) -> None:
    model = _two_fitted_experts(make_model, two_products, normalize_scores=True, **{"routing.unknown_threshold": 1e-6})
    test = two_products["test"]
    with model.raw_scores():
        out = model.predict_features(test)
    assert out.pred_task.tolist() == [UNKNOWN] * 6
    assert torch.isinf(out.pred_score).all() and torch.isinf(out.anomaly_map).all()
    assert out.anomaly_map.shape == (6, 1, 64, 64)
    model.fit_task_thresholds("0", *_labelled(model, "0", test))
    model.fit_task_thresholds("1", *_labelled(model, "1", test))
    normalised = model.predict_features(test)
    assert normalised.pred_task.tolist() == [UNKNOWN] * 6
    assert torch.equal(normalised.pred_score, torch.ones(6))  # on the normalised scale: 1
    assert torch.equal(normalised.anomaly_map, torch.ones(6, 1, 64, 64))
    model.router.unknown_threshold = None  # the flag is the only reason: without it, all are routed
    assert torch.equal(model.predict_features(test).pred_task, two_products["labels"])


def _labelled(model: MoLEFlowModel, key: str, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """Raw oracle scores of ``features`` under ``key`` with alternating labels (a stand-in validation set)."""
    with model.oracle(key), model.raw_scores():
        out = model.predict_features(features)
    return out.pred_score, out.anomaly_map[:, 0], torch.arange(len(features)) % 2, None


@torch.no_grad()
def test_hybrid_routing_lets_the_experts_likelihood_decide(make_model: ModelFactory, two_products: dict[str, torch.Tensor]) -> None:
    model = _two_fitted_experts(make_model, two_products, **{"routing.router": "hybrid", "routing.router_top_k": 2})
    test = two_products["test"]
    for layer in model.flow.lora_layers():  # make the two experts differ
        layer.task_bias["1"].normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    mean_nll = torch.stack([model.patch_scores(test, key).flatten(1).double().mean(1) for key in model.task_keys], 1)
    out = model.predict_features(test)
    assert torch.equal(out.pred_task, mean_nll.argmin(dim=1))  # a shortlist of both: likelihood alone decides
    prototype = model.router.distances(pool_features(test)).argmin(dim=1)
    assert not torch.equal(out.pred_task, prototype)  # stage 1 alone would decide otherwise here


def test_routing_off_has_no_route(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model(**{"routing.router": "none"}).eval()
    model.fit_task_statistics("0", [features])
    model.add_task()
    model.fit_task_statistics("1", [features])
    assert not model.routing_active
    with pytest.raises(RuntimeError, match="routing is off"):
        model.route(features)
    with torch.no_grad():
        assert model.predict_features(features).pred_task.tolist() == [1] * 4


# ----------------------------------------------------------------------------- state dicts
def _two_task_model(make_model: ModelFactory, features: torch.Tensor) -> MoLEFlowModel:
    """Two trained experts named "bottle" and "cable", task 0's statistics and thresholds fitted."""
    torch.manual_seed(0)
    model = make_model()
    model.task_names = ["bottle"]
    _train(model, "0", features, steps=2)
    model.fit_task_statistics("0", [features])
    with torch.no_grad(), model.oracle("0"):
        out = model.predict_features(features)
    model.fit_task_thresholds("0", out.pred_score, out.anomaly_map[:, 0], torch.tensor([0, 1, 0, 1]), None)
    model.add_task("cable")
    _train(model, "1", features, steps=2)
    return model


def test_load_state_dict_creates_the_experts_and_restores_names(
    make_model: ModelFactory, tiny_config: MoLEFlowConfig, features: torch.Tensor
) -> None:
    model = _two_task_model(make_model, features)
    model.set_task("0")
    state = model.state_dict()
    assert state["_extra_state"] == {"task_names": ["bottle", "cable"], "active_task": "0"}  # plain data
    fresh = MoLEFlowModel(tiny_config)  # no add_task: loading creates the experts
    fresh.load_state_dict(state)
    assert fresh.task_keys == ["0", "1"] and fresh.task_names == ["bottle", "cable"]
    assert fresh.active_task == "0"
    assert all(layer.active_adapter == "0" for layer in fresh.flow.lora_layers())
    assert differing_keys(fresh.state_dict(), state) == []
    assert fresh.router.fitted("0") and not fresh.router.fitted("1")
    assert fresh.thresholds.fitted("0") and not fresh.thresholds.fitted("1")
    fresh.eval()
    model.eval()
    for key in ("0", "1"):
        assert torch.equal(_scores(fresh, features, key).pred_score, _scores(model, features, key).pred_score)
        assert torch.equal(_scores(fresh, features, key).anomaly_map, _scores(model, features, key).anomaly_map)


def test_extra_state_must_match_the_experts(make_model: ModelFactory) -> None:
    model = make_model()
    with pytest.raises(RuntimeError, match="extra state names 2 tasks, the state dict holds 1 experts"):
        model.set_extra_state({"task_names": ["a", "b"], "active_task": "0"})
    model.set_extra_state({"task_names": ["bottle"], "active_task": None})
    assert model.task_names == ["bottle"] and model.active_task == "0"


def _legacy(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as written before checkpoint format 2: router ``slots``, normaliser ``stats``
    without fitted flags, no extra state."""
    legacy: dict[str, Any] = {}
    for name, value in state.items():
        if name == "_extra_state" or (name.startswith("thresholds.tasks.") and name.endswith(".fitted")):
            continue
        name = name.replace("router.tasks.", "router.slots.").replace("thresholds.tasks.", "normalizer.stats.")
        legacy[name] = value
    return legacy


def test_a_pre_format_2_state_dict_loads(make_model: ModelFactory, tiny_config: MoLEFlowConfig, features: torch.Tensor) -> None:
    model = _two_task_model(make_model, features)
    state = model.state_dict()
    fresh = MoLEFlowModel(tiny_config)
    fresh.load_state_dict(_legacy(state))
    assert fresh.task_keys == ["0", "1"]
    assert fresh.task_names == ["0", "1"]  # the names lived outside the state dict then: the keys
    assert fresh.active_task == "1"  # the last expert
    assert fresh.thresholds.fitted("0") and not fresh.thresholds.fitted("1")  # from the NaN thresholds
    assert differing_keys({k: v for k, v in fresh.state_dict().items() if k != "_extra_state"}, {k: v for k, v in state.items() if k != "_extra_state"}) == []


def test_patch_memory_adds_its_image_z_score_and_fuses_the_map(make_model: ModelFactory, features: torch.Tensor) -> None:
    """With the memory fitted, image score = the fused flow/global score + weight * z(memory), and
    the map is the surprisal fusion of the flow + Gaussian map scores with the memory distances."""
    model = make_model(**{"scoring.patch_memory_weight": 2.0}).eval()
    key = model.active_task
    model.fit_task_statistics(key, [features[:2], features[2:]])
    assert model.patch_memory.fitted(key)
    with torch.no_grad():
        out = model.score_features(features, key)
        flow_nll = model.patch_scores(features, key)
        base = model.global_score(key, model.anomaly_map_generator.image_score(flow_nll), model.global_input(features))
        distances = model.patch_memory.distances(key, features)
        torch.testing.assert_close(out.pred_score, base + 2.0 * model.patch_memory.image_z(key, distances))
        fused = model.patch_memory.fuse_map(key, model.map_scores(features, key, flow_nll), distances)
        torch.testing.assert_close(out.anomaly_map, model.anomaly_map_generator(fused))


def test_memory_router_decides_by_the_median_memory_distance(make_model: ModelFactory, features: torch.Tensor) -> None:
    """Stage 2 of the default router: the candidate whose memory is nearest in the median patch,
    whatever the prototypes say."""
    model = make_model().eval()
    model.fit_task_statistics("0", [features[:2], features[2:]])
    model.add_task()
    other = features + 3.0  # another product
    model.fit_task_statistics("1", [other[:2], other[2:]])
    assert model.routing_active
    mixed = torch.cat([features[:2], other[:2]])
    assert model.predict_features(mixed).pred_task.tolist() == [0, 0, 1, 1]
    # swap the prototypes: the shortlist (both tasks) is the same, the memory still decides
    for name in ("mean", "precision"):
        a, b = getattr(model.router.tasks["0"], name), getattr(model.router.tasks["1"], name)
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)
    assert model.predict_features(mixed).pred_task.tolist() == [0, 0, 1, 1]


def test_hybrid_candidate_score_is_the_mean_patch_nll(make_model: ModelFactory, features: torch.Tensor) -> None:
    """The notes' V3-5 stage 2: the image log-likelihood is minus the mean patch NLL."""
    model = make_model(router="hybrid").eval()
    with torch.no_grad():
        expected = model.patch_scores(features, "0").flatten(1).double().mean(dim=1)
        torch.testing.assert_close(model._candidate_score(features, "0"), expected)  # noqa: SLF001
