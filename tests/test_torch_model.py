"""MoLE-Flow torch model: outputs, identity start of new experts, what trains when, and the
core promise of the design: learning a new task leaves earlier tasks bit-identical.

All tests use a tiny model (EfficientNet-Lite0 at 64 px: an 8 x 8 grid of 152-d patches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.dia import SimpleSubnet
from anomalib_moleflow.models.moleflow.input_adapters import WhiteningAdapter
from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss, patch_nll
from anomalib_moleflow.models.moleflow.torch_model import MoLEFlowModel
from support import same_bits

GRID = 8
CHANNELS = 152
ModelFactory = Callable[..., MoLEFlowModel]


@pytest.fixture
def make_model(tiny_config: Mapping[str, Any]) -> ModelFactory:
    """``make_model(**overrides)``: a seeded tiny model with its first expert added."""

    def factory(**overrides: Any) -> MoLEFlowModel:  # noqa: ANN401
        torch.manual_seed(0)
        model = MoLEFlowModel(MoLEFlowConfig(**{**tiny_config, **overrides}))
        model.add_task()
        return model

    return factory


@pytest.fixture(scope="module")
def features(tiny_config: Mapping[str, Any]) -> torch.Tensor:
    """Backbone features of 4 random 64 px images ``(4, 8, 8, 152)`` (the backbone is pretrained and
    frozen, so every tiny model computes the same features)."""
    torch.manual_seed(1)
    model = MoLEFlowModel(MoLEFlowConfig(**tiny_config))
    return model.extract_features(torch.rand(4, 3, 64, 64))


def _train(model: MoLEFlowModel, key: str, features: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on ``key`` with the real loss, as ``MoLEFlow.configure_optimizers`` sets up."""
    params = model.prepare_task_training(key)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=model.config.weight_decay)
    loss_fn = MoLEFlowLoss(tail_weight=model.config.tail_weight, logdet_reg=model.config.logdet_reg)
    model.train()
    for step in range(steps):
        batch = features[step % 2 :: 2] if len(features) > 1 else features
        z, log_jac_det = model.flow_forward(batch, key)
        loss = loss_fn(z, log_jac_det)[0] + model.regularization(key)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, model.config.grad_clip)
        optimizer.step()
    model.eval()


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    wanted = _ids(params)
    return {name for name, p in model.named_parameters() if id(p) in wanted}


@torch.no_grad()
def _scores(model: MoLEFlowModel, features: torch.Tensor, key: str) -> InferenceBatch:
    return model.score_features(features, key)


# ----------------------------------------------------------------------------- outputs
def test_eval_forward_returns_inference_batch(make_model: ModelFactory) -> None:
    model = make_model().eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert isinstance(out, InferenceBatch)
    assert out.pred_score.shape == (3,)
    assert out.anomaly_map.shape == (3, 1, 64, 64)
    assert torch.isfinite(out.pred_score).all()
    assert torch.isfinite(out.anomaly_map).all()
    # the image score is the mean of the top-k (k = 3) patch NLLs of the image
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        patch = model.patch_scores(model.extract_features(images)).flatten(1)
        batch = model(images)
    expected = patch.topk(model.config.score_top_k, dim=1).values.mean(dim=1)
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


def test_no_expert_raises(tiny_config: Mapping[str, Any]) -> None:
    model = MoLEFlowModel(MoLEFlowConfig(**tiny_config))
    with pytest.raises(RuntimeError, match="add_task"):
        model.flow_forward(torch.zeros(1, GRID, GRID, CHANNELS))
    with pytest.raises(KeyError):
        model.set_task("0")


def test_add_task_keys_and_active_expert(make_model: ModelFactory) -> None:
    model = make_model()
    assert model.task_keys == ["0"]
    assert model.active_task == "0"
    assert model.add_task() == "1"
    assert model.task_keys == ["0", "1"]
    assert model.num_tasks == 2
    assert model.active_task == "1"
    assert set(model.dia) == {"0", "1"}
    assert set(model.input_adapters) == {"0", "1"}
    model.set_task(0)
    assert model.active_task == "0"
    assert all(layer.active_adapter == "0" for layer in model.flow.lora_layers())


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
    assert len(last_layers) == 2 * model.config.dia_n_blocks
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
    assert model.config.use_dia and len(model.dia) == 1
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


def test_parameter_groups_partition_the_trainable_model(make_model: ModelFactory) -> None:
    model = make_model()
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
    """Copy of every state entry (parameters and buffers) except those of expert ``key``."""
    own = _names(model, model.expert_parameters(key))
    return {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items() if name not in own}


def test_training_task1_leaves_task0_bit_identical(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model()
    _train(model, "0", features)
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
    """Sanity check of the test above: when the shared context keeps training (V4),
    task 0's scores do move, so bit-identity is a real property of V4.1, not an artefact."""
    model = make_model(freeze_context_after_task0=False)
    _train(model, "0", features)
    model.add_task()
    before = _scores(model, features, "0")
    _train(model, "1", features, steps=4)
    after = _scores(model, features, "0")
    assert not torch.equal(after.pred_score, before.pred_score)


# ----------------------------------------------------------------------------- position Gaussian
@torch.no_grad()
def test_map_scores_add_the_weighted_position_gaussian_once_fitted(make_model: ModelFactory, features: torch.Tensor) -> None:
    model = make_model(position_gaussian_weight=0.5)
    key = model.active_task
    model.eval()
    flow_only = model.patch_scores(features, key)
    assert torch.equal(model.map_scores(features, key), flow_only)  # unfitted: the notes' flow NLL
    model.fit_scoring_statistics(key, [features[:2], features[2:]])
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
