"""MoLE-Flow as an anomalib module: construction, hyper-parameters, optimiser, checkpoints,
and the per-fit feature cache.

Training runs use anomalib's ``Engine`` on the tiny generated ``widget`` category
(12 training images of 64 px) and the tiny model configuration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib import LearningType
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.data import MVTecADLocal
from support import quiet_engine, same_bits

N_TRAIN = 12  # training images of the widget category (see conftest.make_widget_dataset)




def _datamodule(widget_root: Path) -> MVTecADLocal:
    return MVTecADLocal(root=widget_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)


def _transforms(pre_processor: PreProcessor) -> list[Any]:
    transform = pre_processor.transform
    return list(transform.transforms) if isinstance(transform, Compose) else [transform]


def _is_plain(value: Any) -> bool:  # noqa: ANN401
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))




# ----------------------------------------------------------------------------- construction
def test_default_model_and_pre_processor() -> None:
    model = MoLEFlow()
    assert model.config == MoLEFlowConfig()
    assert isinstance(model.pre_processor, PreProcessor)
    resize, normalize = _transforms(model.pre_processor)
    assert isinstance(resize, Resize)
    assert tuple(resize.size) == (256, 256)
    assert isinstance(normalize, Normalize)
    # tf_efficientnet_lite was trained on inputs scaled to [-1, 1], not ImageNet statistics
    assert list(normalize.mean) == pytest.approx([0.5, 0.5, 0.5])
    assert list(normalize.std) == pytest.approx([0.5, 0.5, 0.5])
    out = model.pre_processor.transform(torch.full((1, 3, 100, 120), 0.75))
    assert out.shape == (1, 3, 256, 256)
    assert torch.allclose(out, torch.full_like(out, 0.5))
    assert model.learning_type == LearningType.ONE_CLASS
    assert model.trainer_arguments["gradient_clip_val"] == model.config.grad_clip
    assert model.trainer_arguments["num_sanity_val_steps"] == 0


def test_pre_processor_follows_config(tiny_config: Mapping[str, Any]) -> None:
    model = MoLEFlow(config=dict(tiny_config))
    resize, _ = _transforms(model.pre_processor)
    assert tuple(resize.size) == (64, 64)
    # another backbone, another normalisation (checked without building the ViT)
    dinov2 = MoLEFlow.configure_moleflow_pre_processor(
        MoLEFlowConfig(backbone="vit_small_patch14_dinov2", image_size=224),
    )
    resize, normalize = _transforms(dinov2)
    assert tuple(resize.size) == (224, 224)
    assert list(normalize.mean) == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)
    assert list(normalize.std) == pytest.approx([0.229, 0.224, 0.225], abs=1e-3)


def test_custom_or_disabled_pre_processor(tiny_config: Mapping[str, Any]) -> None:
    custom = PreProcessor(transform=Resize((64, 64)))
    assert MoLEFlow(config=dict(tiny_config), pre_processor=custom).pre_processor is custom
    assert MoLEFlow(config=dict(tiny_config), pre_processor=False).pre_processor is None


def test_config_from_dict_and_plain_hparams(tiny_config: Mapping[str, Any]) -> None:
    model = MoLEFlow(config={**tiny_config, "lora_rank": 4, "layers": [2, 3]})
    assert isinstance(model.config, MoLEFlowConfig)
    assert model.config.lora_rank == 4
    assert model.config.layers == (2, 3)
    model.add_task()
    assert {layer.rank for layer in model.model.flow.lora_layers()} == {4}
    hparams_config = model.hparams["config"]
    assert type(hparams_config) is dict
    assert _is_plain(hparams_config)
    assert hparams_config == model.config.to_dict()
    json.dumps(hparams_config)  # plain data: safe under torch.load(weights_only=True)
    assert MoLEFlowConfig.from_dict(hparams_config) == model.config
    # a config object is stored as a plain dict as well
    from_object = MoLEFlow(config=MoLEFlowConfig(**tiny_config))
    assert type(from_object.hparams["config"]) is dict
    assert from_object.hparams["config"] == hparams_config | {"lora_rank": 2}


def test_unknown_config_key_is_named(tiny_config: Mapping[str, Any]) -> None:
    with pytest.raises(ValueError, match="lora_rnak"):
        MoLEFlow(config={**tiny_config, "lora_rnak": 4})


def test_configure_optimizers_uses_the_active_task(tiny_config: Mapping[str, Any]) -> None:
    model = MoLEFlow(config=dict(tiny_config))
    model.add_task()
    model.add_task()
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.model.expert_parameters("1")}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(model.config.lr)
    assert config["lr_scheduler"]["interval"] == "step"


def test_setup_adds_the_first_expert_once(tiny_config: Mapping[str, Any]) -> None:
    model = MoLEFlow(config=dict(tiny_config))
    assert model.model.num_tasks == 0
    model.setup("fit")
    model.setup("test")
    assert model.model.task_keys == ["0"]


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_two_tasks(
    tiny_config: Mapping[str, Any], widget_root: Path, tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = MoLEFlow(config=dict(tiny_config))
    datamodule = _datamodule(widget_root)
    quiet_engine(tmp_path / "task0", max_epochs=1).fit(model, datamodule=datamodule)
    model.add_task()
    engine = quiet_engine(tmp_path / "task1", max_epochs=1)  # a fresh Engine per task
    engine.fit(model, datamodule=datamodule)
    assert model.model.task_keys == ["0", "1"]

    path = tmp_path / "two_tasks.ckpt"
    engine.trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert raw["moleflow_task_keys"] == ["0", "1"]
    assert _is_plain(raw["hyper_parameters"]["config"])

    loaded = MoLEFlow.load_from_checkpoint(path)  # weights_only=True by default in anomalib
    assert loaded.model.task_keys == ["0", "1"]
    assert loaded.model.active_task == "1"
    assert loaded.config == model.config
    expected_state = model.state_dict()
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(expected_state)
    for name, value in expected_state.items():
        assert same_bits(loaded_state[name], value), name

    model.eval()
    loaded.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.model.extract_features(images)
        for key in ("0", "1"):
            original = model.model.score_features(features, key)
            restored = loaded.model.score_features(features, key)
            assert torch.equal(restored.pred_score, original.pred_score), key
            assert torch.equal(restored.anomaly_map, original.anomaly_map), key
        # the whole module (pre-processor, routed/active expert, post-processor) as well
        original, restored = model(images), loaded(images)
    assert torch.equal(restored.pred_score, original.pred_score)
    assert torch.equal(restored.anomaly_map, original.anomaly_map)
    assert not torch.equal(
        model.model.score_features(features, "0").pred_score,
        model.model.score_features(features, "1").pred_score,
    )

    # the checkpoint anomalib's Engine wrote by itself loads the same way
    callback = engine.trainer.checkpoint_callback
    auto = callback.best_model_path or callback.last_model_path
    assert auto, "anomalib's Engine saved no checkpoint"
    assert MoLEFlow.load_from_checkpoint(auto).model.task_keys == ["0", "1"]


# ----------------------------------------------------------------------------- feature cache
def _count_backbone_images(model: MoLEFlow) -> list[tuple[bool, int]]:
    """Record ``(module in training mode, batch size)`` for every backbone call."""
    calls: list[tuple[bool, int]] = []
    backbone = model.model.feature_extractor.backbone
    original = backbone.forward

    def counting(images: torch.Tensor) -> Any:  # noqa: ANN401
        calls.append((model.training, images.shape[0]))
        return original(images)

    backbone.forward = counting
    return calls


def _training_images(calls: list[tuple[bool, int]]) -> int:
    return sum(n for training, n in calls if training)


def test_feature_cache_runs_the_backbone_once_per_image_and_fit(
    tiny_config: Mapping[str, Any], widget_root: Path, tmp_path: Path,
) -> None:
    model = MoLEFlow(config={**tiny_config, "cache_features": True})
    calls = _count_backbone_images(model)
    datamodule = _datamodule(widget_root)
    quiet_engine(tmp_path / "a", max_epochs=2).fit(model, datamodule=datamodule)
    assert _training_images(calls) == N_TRAIN  # not N_TRAIN per epoch
    # training and (in-fit) validation images are each cached once
    assert len(model._feature_cache) == N_TRAIN + len(datamodule.val_data)
    channels = model.model.feature_extractor.total_channels  # 152 patch + pooled global channels
    assert all(f.shape == (8, 8, channels) and not f.requires_grad for f in model._feature_cache.values())
    # a new task starts a new fit with an empty cache: its features are computed again, once
    calls.clear()
    model.add_task()
    quiet_engine(tmp_path / "b", max_epochs=2).fit(model, datamodule=datamodule)
    assert _training_images(calls) == N_TRAIN


def test_without_cache_the_backbone_runs_every_epoch(
    tiny_config: Mapping[str, Any], widget_root: Path, tmp_path: Path,
) -> None:
    model = MoLEFlow(config={**tiny_config, "cache_features": False})
    calls = _count_backbone_images(model)
    quiet_engine(tmp_path, max_epochs=2).fit(model, datamodule=_datamodule(widget_root))
    assert _training_images(calls) == 2 * N_TRAIN
    assert not model._feature_cache


def test_scoring_statistics_are_fitted_on_the_training_images(
    tiny_config: Mapping[str, Any], widget_root: Path, tmp_path: Path,
) -> None:
    model = MoLEFlow(config={**tiny_config, "global_score_weight": 0.5})
    quiet_engine(tmp_path, max_epochs=1).fit(model, datamodule=_datamodule(widget_root))
    fusion = model.model.global_score
    assert fusion is not None and fusion.fitted("0")
    assert len(model._train_paths) == N_TRAIN
    train = torch.stack([model._feature_cache[p] for p in model._train_paths])
    model.eval()
    with torch.no_grad():
        scores = model.model.score_features(train, "0").pred_score
    # z-normalised on exactly these images: the fused training scores average to zero
    assert abs(float(scores.mean())) < 1e-3
    gaussian = model.model.position_gaussian
    assert gaussian is not None and gaussian.fitted("0")
    with torch.no_grad():
        expected = model.model.patch_scores(train, "0") + gaussian("0", train)  # default weight 1
        torch.testing.assert_close(model.model.map_scores(train, "0"), expected)
