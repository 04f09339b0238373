"""MoLE-Flow as an anomalib module: construction, hyper-parameters, optimiser, post-processing,
checkpoints, the per-task statistics fitted at the end of each fit, and the per-fit feature cache.

Training runs use anomalib's ``Engine`` on the tiny generated ``widget`` category (12 training
images and 8 validation/test images of 64 px) and the tiny model configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from anomalib import LearningType
from anomalib.data import ImageBatch, ImageItem
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from helpers import (
    TINY_CONFIG,
    differing_keys,
    quiet_engine,
    read_image,
    same_bits,
    task_test_images,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import Compose, Normalize, Resize
from torchvision.tv_tensors import Image

from anomalib_moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.data import MVTecADLocal
from anomalib_moleflow.io import CheckpointError
from anomalib_moleflow.models.moleflow import RoutedInferenceBatch
from anomalib_moleflow.models.moleflow.checkpoint_format import model_checkpoint
from anomalib_moleflow.models.moleflow.gaussian import pool_features
from anomalib_moleflow.models.moleflow.lightning_model import _first_loader, eval_mode
from anomalib_moleflow.models.moleflow.post_processing import (
    NormalizedScorePostProcessor,
    normalized_score_post_processor,
)
from anomalib_moleflow.models.moleflow.task_statistics import TaskThresholds

N_TRAIN = 12  # training images of the widget category (see conftest.widget_root)
N_VAL = 8  # its validation split: the 4 good and 4 defective test images


def _datamodule(widget_root: Path) -> MVTecADLocal:
    return MVTecADLocal(root=widget_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)


def _transforms(pre_processor: PreProcessor) -> list[Any]:
    transform = pre_processor.transform
    return list(transform.transforms) if isinstance(transform, Compose) else [transform]


def _is_plain(value: Any) -> bool:  # noqa: ANN401
    """Whether ``value`` is plain python data (what ``torch.load(weights_only=True)`` accepts)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _post_values(post: PostProcessor) -> list[float]:
    return [float(getattr(post, n)) for n in ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")]


def _widget_images(widget_root: Path) -> torch.Tensor:
    """The 8 raw widget test images ``(8, 3, 64, 64)`` in ``[0, 1]``."""
    return torch.stack([read_image(p) for p in task_test_images(widget_root, "widget")])


@pytest.fixture(scope="module")
def two_tasks(tiny_config: MoLEFlowConfig, widget_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A module fitted on the widget data twice (task "0", then task "1" named "second"), one
    Engine per task. Read it, don't change it: ``model``, ``engine`` (of task 1), ``datamodule``, ``root``."""
    root = tmp_path_factory.mktemp("two_tasks")
    torch.manual_seed(0)
    model = MoLEFlow(config=tiny_config)
    datamodule = _datamodule(widget_root)
    quiet_engine(root / "task0", max_epochs=1).fit(model, datamodule=datamodule)
    model.add_task("second")
    engine = quiet_engine(root / "task1", max_epochs=1)  # a fresh Engine per task
    engine.fit(model, datamodule=datamodule)
    return SimpleNamespace(model=model, engine=engine, datamodule=datamodule, root=root)


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
    assert model.trainer_arguments["gradient_clip_val"] == model.config.optim.grad_clip
    assert model.trainer_arguments["num_sanity_val_steps"] == 0
    assert model.normalize_scores is False and not model.model.normalizes_scores
    assert type(model.post_processor) is PostProcessor  # anomalib's own


def test_pre_processor_follows_config(tiny_config: MoLEFlowConfig) -> None:
    model = MoLEFlow(config=tiny_config)
    resize, _ = _transforms(model.pre_processor)
    assert tuple(resize.size) == (64, 64)
    # another backbone, another normalisation (checked without building the ViT)
    dinov2 = MoLEFlow.configure_moleflow_pre_processor(
        MoLEFlowConfig.from_dict({"features": {"backbone": "vit_small_patch14_dinov2", "image_size": 224}}),
    )
    resize, normalize = _transforms(dinov2)
    assert tuple(resize.size) == (224, 224)
    assert list(normalize.mean) == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)
    assert list(normalize.std) == pytest.approx([0.229, 0.224, 0.225], abs=1e-3)


def test_custom_or_disabled_pre_processor(tiny_config: MoLEFlowConfig) -> None:
    custom = PreProcessor(transform=Resize((64, 64)))
    assert MoLEFlow(config=tiny_config, pre_processor=custom).pre_processor is custom
    assert MoLEFlow(config=tiny_config, pre_processor=False).pre_processor is None


@pytest.mark.parametrize(
    "config",
    [
        {**TINY_CONFIG, "experts": {**TINY_CONFIG["experts"], "lora_rank": 4}, "features": {**TINY_CONFIG["features"], "layers": [2, 3]}},
        {"backbone": "tf_efficientnet_lite0", "image_size": 64, "grid_downsample": 1, "n_coupling_blocks": 2,
         "subnet_hidden_ratio": 0.5, "dia_hidden_ratio": 0.25, "lora_rank": 4, "layers": [2, 3]},  # flat, as before the groups
    ],
    ids=["grouped", "flat"],
)
def test_config_from_dict_and_plain_hparams(config: dict[str, Any], tiny_config: MoLEFlowConfig) -> None:
    model = MoLEFlow(config=config)
    assert isinstance(model.config, MoLEFlowConfig)
    assert model.config == tiny_config.updated({"lora_rank": 4})
    assert model.config.experts.lora_rank == 4
    assert model.config.features.layers == (2, 3)
    model.add_task()
    assert {layer.rank for layer in model.model.flow.lora_layers()} == {4}
    hparams_config = model.hparams["config"]
    assert type(hparams_config) is dict
    assert _is_plain(hparams_config)
    assert hparams_config == model.config.to_dict()
    json.dumps(hparams_config)  # plain data: safe under torch.load(weights_only=True)
    assert MoLEFlowConfig.from_dict(hparams_config) == model.config
    # a config object is stored as a plain dict as well
    from_object = MoLEFlow(config=tiny_config)
    assert type(from_object.hparams["config"]) is dict
    expected = json.loads(json.dumps(hparams_config))
    expected["experts"]["lora_rank"] = 2
    assert from_object.hparams["config"] == expected
    assert from_object.hparams["normalize_scores"] is False


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError, match="lora_rnak"):
        MoLEFlow(config={**TINY_CONFIG, "lora_rnak": 4})
    with pytest.raises(ValueError, match=r"experts\.lora_rank must be >= 1"):
        MoLEFlow(config={"experts": {"lora_rank": 0}})


def test_normalize_scores_is_a_constructor_argument(tiny_config: MoLEFlowConfig) -> None:
    model = MoLEFlow(config=tiny_config, normalize_scores=True)
    assert model.normalize_scores and model.model.normalizes_scores
    assert model.hparams["normalize_scores"] is True
    assert isinstance(model.post_processor, NormalizedScorePostProcessor)
    assert _post_values(model.post_processor) == [0.5, 0.5, 0.0, 1.0, 0.0, 1.0]
    # it passes [0, 1] scores through and labels them above 0.5
    scores = torch.tensor([0.0, 0.3, 0.5, 0.51, 1.0])
    out = model.post_processor(RoutedInferenceBatch(pred_score=scores, anomaly_map=scores[:, None, None, None].expand(-1, 1, 2, 2)))
    assert torch.equal(out.pred_score, scores)
    assert out.pred_label.tolist() == [False, False, False, True, True]
    custom = PostProcessor()
    assert MoLEFlow(config=tiny_config, normalize_scores=True, post_processor=custom).post_processor is custom
    assert isinstance(normalized_score_post_processor(), NormalizedScorePostProcessor)


def test_configure_optimizers_uses_the_active_task(tiny_config: MoLEFlowConfig) -> None:
    model = MoLEFlow(config=tiny_config)
    model.add_task()
    model.add_task()
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.model.expert_parameters("1")}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(model.config.optim.lr)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(model.config.optim.weight_decay)
    assert config["lr_scheduler"]["interval"] == "step"
    scheduler = config["lr_scheduler"]["scheduler"]
    assert scheduler.get_last_lr()[0] == pytest.approx(model.config.optim.lr)  # cosine from the full rate


def test_setup_adds_the_first_expert_once(tiny_config: MoLEFlowConfig) -> None:
    model = MoLEFlow(config=tiny_config)
    assert model.model.num_tasks == 0
    model.setup("fit")
    model.setup("test")
    assert model.model.task_keys == ["0"]


def test_eval_mode_restores_every_submodules_own_mode() -> None:
    parent = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    parent.train()
    parent[1].eval()
    with eval_mode(parent):
        assert not any(m.training for m in parent.modules())
    assert parent.training and parent[0].training and not parent[1].training


def test_first_loader_of_lightnings_loader_collections() -> None:
    loader = object()
    assert _first_loader(loader) is loader
    assert _first_loader([loader, object()]) is loader
    assert _first_loader({"a": loader}) is loader
    assert _first_loader([]) is None and _first_loader({}) is None


# ----------------------------------------------------------------------------- fitting a task
def test_fit_fits_the_tasks_statistics_and_thresholds(two_tasks: SimpleNamespace) -> None:
    model = two_tasks.model.model
    assert model.task_keys == ["0", "1"] and model.task_names == ["0", "second"]
    for statistics in model.task_statistics:
        assert statistics.n_fitted == 2, type(statistics).__name__
    assert model.routing_active


def test_thresholds_come_from_the_raw_oracle_scores_of_the_validation_split(two_tasks: SimpleNamespace) -> None:
    module = two_tasks.model
    module.eval()
    loader = two_tasks.datamodule.val_dataloader()
    for key in ("0", "1"):
        scores, maps, labels, masks = [], [], [], []
        with torch.no_grad(), module.model.oracle(key), module.model.raw_scores():
            for batch in loader:
                images, mask = module.prepare_batch(batch)
                out = module.model(images)
                scores.append(out.pred_score)
                maps.append(out.anomaly_map[:, 0])
                labels.append(batch.gt_label.long())
                masks.append(mask)
        assert sum(len(s) for s in scores) == N_VAL
        reference = TaskThresholds()
        expected = reference.fit_from_scores(key, torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks))
        assert module.model.thresholds.fitted(key)
        assert module.model.thresholds.values(key) == pytest.approx(expected, rel=1e-5)
        assert expected["image_min"] < expected["image_threshold"] <= expected["image_max"]


def test_scoring_statistics_are_fitted_on_the_training_images(two_tasks: SimpleNamespace) -> None:
    module = two_tasks.model
    assert module.feature_cache.holds_all_training
    train = torch.cat(list(module.feature_cache.training_chunks(torch.device("cpu"))))
    assert len(train) == N_TRAIN
    model = module.model
    module.eval()
    with torch.no_grad():
        scores = model.score_features(train, "1").pred_score
        memory = model.config.scoring.patch_memory_weight * model.patch_memory.image_z("1", model.patch_memory.distances("1", train))
        expected = model.patch_scores(train, "1") + model.position_gaussian("1", train)  # default weight 1
        map_scores = model.map_scores(train, "1")
        pooled = pool_features(train)
    # flow and global parts z-normalised on exactly these images: they average to zero (the memory's
    # part is normalised on distances with each image's own patches left out of the memory)
    assert abs(float((scores - memory).mean())) < 1e-3
    assert float(memory.mean()) < 0  # in-sample, the memory holds the images' own patches
    torch.testing.assert_close(map_scores, expected)
    assert torch.allclose(model.router.tasks["1"].mean, pooled.double().mean(0).float(), atol=1e-5)


def test_statistics_are_fitted_on_pre_processed_training_images(tiny_config: MoLEFlowConfig) -> None:
    """At the end of a fit the module fits its router (and the other statistics) on the training
    images as the pre-processor hands them to the model, not on the raw ones."""
    torch.manual_seed(0)
    module = MoLEFlow(tiny_config, evaluator=False, visualizer=False, post_processor=False)
    module.setup("fit")
    fitted: list[tuple[str, torch.Tensor]] = []
    router = module.model.router
    fit = router.fit
    router.fit = lambda key, pooled: (fitted.append((key, pooled)), fit(key, pooled))  # type: ignore[method-assign]
    tasks = [_Images(10, 0, low=0.0), _Images(10, 1, low=0.5)]  # dark product, bright product
    module.train()
    for t, images in enumerate(tasks):
        if t:
            module.add_task()
        module.trainer = _trainer(images)  # type: ignore[assignment]
        module.on_train_end()
        assert module.training  # the training mode is restored
    assert router.task_keys == ["0", "1"] and [k for k, _ in fitted] == ["0", "1"]
    assert module.model.position_gaussian.n_fitted == 2 and module.model.global_score.n_fitted == 2
    assert module.model.thresholds.n_fitted == 0  # no datamodule, no validation split
    with torch.no_grad():
        raw = tasks[0].images
        expected = pool_features(module.model.extract_features(module.pre_processor.transform(raw)))
        unprocessed = pool_features(module.model.extract_features(raw))
    assert not torch.allclose(unprocessed, expected, atol=1e-3)  # pre-processing matters here
    assert fitted[0][1].shape == (10, module.model.feature_extractor.total_channels)
    assert torch.allclose(fitted[0][1], expected, atol=1e-5)
    module.eval()
    with torch.no_grad():
        fresh = torch.cat([_Images(5, 7, 0.0).images, _Images(5, 8, 0.5).images])
        out = module.model(module.pre_processor.transform(fresh))
    assert out.pred_task.tolist() == [0] * 5 + [1] * 5


class _Images(Dataset):
    """``n`` random 72 px images with values in ``[low, low + 0.5]`` (the pre-processor resizes them)."""

    def __init__(self, n: int, seed: int, low: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = low + 0.5 * torch.rand(n, 3, 72, 72, generator=g)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageItem:
        return ImageItem(image=Image(self.images[index]), image_path=f"/task{self.seed}/{index}.png")


def _trainer(dataset: Dataset) -> SimpleNamespace:
    """The one thing the end-of-fit statistics read from the trainer: its training dataloader."""
    return SimpleNamespace(train_dataloader=DataLoader(dataset, batch_size=4, collate_fn=ImageBatch.collate))


def test_normalized_scores_after_a_fit_with_validation(tiny_config: MoLEFlowConfig, widget_root: Path, tmp_path: Path) -> None:
    """With ``normalize_scores`` the module outputs each task's scores on its own [0, 1] scale,
    labelled at 0.5, also after an Engine fit that ran validation."""
    torch.manual_seed(0)
    module = MoLEFlow(config=tiny_config, normalize_scores=True)
    quiet_engine(tmp_path, max_epochs=1).fit(module, datamodule=_datamodule(widget_root))
    assert _post_values(module.post_processor) == [0.5, 0.5, 0.0, 1.0, 0.0, 1.0]
    assert module.model.thresholds.fitted("0")
    module.eval()
    images = _widget_images(widget_root)
    with torch.no_grad():
        out = module(images)
        processed = module.pre_processor(images)
        with module.model.raw_scores():
            raw = module.model(processed)
    expected = module.model.thresholds.normalize("0", raw.pred_score, raw.anomaly_map)
    torch.testing.assert_close(out.pred_score, expected[0])
    assert torch.equal(out.pred_label, out.pred_score > 0.5)
    assert out.pred_label.any()  # the defective images are found
    assert out.pred_task.tolist() == [0] * len(images)


def test_forward_post_processes_and_keeps_the_routed_expert(two_tasks: SimpleNamespace, widget_root: Path) -> None:
    module = two_tasks.model
    module.eval()
    images = _widget_images(widget_root)
    with torch.no_grad():
        out = module(images)
        raw = module.model(module.pre_processor(images))
    assert isinstance(out, RoutedInferenceBatch)
    assert torch.equal(out.pred_task, raw.pred_task)
    assert out.pred_label is not None and out.pred_mask is not None
    post = module.post_processor(raw)
    assert torch.equal(out.pred_score, post.pred_score)
    assert torch.equal(out.anomaly_map, post.anomaly_map)
    bare = MoLEFlow(config=two_tasks.model.config, post_processor=False)
    bare.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("post_processor.")})
    bare.eval()
    with torch.no_grad():
        unprocessed = bare(images)
    assert torch.equal(unprocessed.pred_score, raw.pred_score) and unprocessed.pred_label is None


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_two_tasks(two_tasks: SimpleNamespace) -> None:
    model, engine = two_tasks.model, two_tasks.engine
    path = two_tasks.root / "two_tasks.ckpt"
    engine.trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert raw["state_dict"]["model._extra_state"] == {"task_names": ["0", "second"], "active_task": "1"}
    assert _is_plain(raw["hyper_parameters"]["config"])
    assert raw["hyper_parameters"]["normalize_scores"] is False

    for loaded in (MoLEFlow.load_from_checkpoint(path), MoLEFlow.from_checkpoint(path)):  # anomalib's and ours
        assert loaded.model.task_keys == ["0", "1"]
        assert loaded.model.task_names == ["0", "second"]
        assert loaded.model.active_task == "1"
        assert loaded.config == model.config
        expected_state = model.state_dict()
        loaded_state = loaded.state_dict()
        assert set(loaded_state) == set(expected_state)
        for name, value in expected_state.items():
            if isinstance(value, torch.Tensor):
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
            # the whole module (pre-processor, routed expert, post-processor) as well
            original, restored = model(images), loaded(images)
        assert torch.equal(restored.pred_score, original.pred_score)
        assert torch.equal(restored.anomaly_map, original.anomaly_map)
        assert torch.equal(restored.pred_task, original.pred_task)
    assert not torch.equal(
        model.model.score_features(features, "0").pred_score,
        model.model.score_features(features, "1").pred_score,
    )

    # the checkpoint anomalib's Engine wrote by itself loads the same way
    callback = engine.trainer.checkpoint_callback
    auto = callback.best_model_path or callback.last_model_path
    assert auto, "anomalib's Engine saved no checkpoint"
    assert MoLEFlow.load_from_checkpoint(auto).model.task_keys == ["0", "1"]
    assert MoLEFlow.from_checkpoint(auto).model.task_names == ["0", "second"]


def test_from_checkpoint_is_in_eval_mode_and_refuses_other_files(two_tasks: SimpleNamespace, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    two_tasks.engine.trainer.save_checkpoint(path)
    loaded = MoLEFlow.from_checkpoint(path, visualizer=False)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert loaded.visualizer is None
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}, "hyper_parameters": {"lr": 0.1}}, other)
    with pytest.raises(CheckpointError, match="holds no MoLE-Flow configuration"):
        MoLEFlow.from_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        MoLEFlow.from_checkpoint(tmp_path / "missing.ckpt")


def test_ckpt_path_into_a_module_built_with_another_config(two_tasks: SimpleNamespace, tmp_path: Path) -> None:
    """``anomalib ... --ckpt_path`` builds the module from the command line first: loading the
    checkpoint rebuilds the torch model from the checkpoint's settings."""
    path = tmp_path / "model.ckpt"
    two_tasks.engine.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module = MoLEFlow(config=two_tasks.model.config.updated({"lora_rank": 4}), normalize_scores=True)
    module.on_load_checkpoint(checkpoint)
    assert module.config == two_tasks.model.config and module.normalize_scores is False
    assert module.hparams["config"] == two_tasks.model.config.to_dict()
    module.load_state_dict(checkpoint["state_dict"])
    assert module.model.task_names == ["0", "second"]
    assert differing_keys(module.model.state_dict(), two_tasks.model.model.state_dict()) == []


def test_ckpt_path_of_a_normalizing_model_rebuilds_the_processors_in_place(two_tasks: SimpleNamespace) -> None:
    """A continual checkpoint (scores normalised per task) loaded into a module built from the
    command line: Lightning already holds the pre- and post-processor as callbacks, so the same
    objects take the checkpoint's image size and the fixed 0.5 thresholds."""
    checkpoint = model_checkpoint(two_tasks.model.state_dict(), two_tasks.model.config, normalize_scores=True)
    module = MoLEFlow(config=two_tasks.model.config.updated({"features.image_size": 96}))
    pre, post = module.pre_processor, module.post_processor
    assert type(post) is PostProcessor and _transforms(pre)[0].size == [96, 96]
    module.on_load_checkpoint(checkpoint)
    assert module.pre_processor is pre and module.post_processor is post
    assert _transforms(pre)[0].size == [64, 64] and _transforms(pre)[0].antialias
    assert isinstance(post, NormalizedScorePostProcessor) and module.normalize_scores and module.model.normalizes_scores
    module.load_state_dict(checkpoint["state_dict"])
    images = torch.rand(2, 3, 80, 80)
    reference = MoLEFlow(config=two_tasks.model.config, normalize_scores=True)
    reference.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        got, want = module.eval()(images), reference.eval()(images)
    assert torch.equal(got.pred_score, want.pred_score) and torch.equal(got.pred_task, want.pred_task)


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
    tiny_config: MoLEFlowConfig, widget_root: Path, tmp_path: Path,
) -> None:
    model = MoLEFlow(config=tiny_config.updated({"cache_features": True}))
    calls = _count_backbone_images(model)
    datamodule = _datamodule(widget_root)
    quiet_engine(tmp_path / "a", max_epochs=2).fit(model, datamodule=datamodule)
    assert _training_images(calls) == N_TRAIN  # not N_TRAIN per epoch
    assert sum(n for _, n in calls) == N_TRAIN + N_VAL  # validation images too, once; statistics from the cache
    # training and (in-fit) validation images are each cached once
    assert len(model.feature_cache) == N_TRAIN + len(datamodule.val_data)
    channels = model.model.feature_extractor.total_channels  # 152 patch + pooled global channels
    train = list(model.feature_cache.training_chunks(torch.device("cpu")))
    assert sum(len(c) for c in train) == N_TRAIN
    assert all(c.shape[1:] == (8, 8, channels) and not c.requires_grad for c in train)
    # a new task starts a new fit with an empty cache: its features are computed again, once
    calls.clear()
    model.add_task()
    assert len(model.feature_cache) == 0
    quiet_engine(tmp_path / "b", max_epochs=2).fit(model, datamodule=datamodule)
    assert _training_images(calls) == N_TRAIN


def test_without_cache_the_backbone_runs_every_epoch(
    tiny_config: MoLEFlowConfig, widget_root: Path, tmp_path: Path,
) -> None:
    model = MoLEFlow(config=tiny_config.updated({"cache_features": False}))
    calls = _count_backbone_images(model)
    quiet_engine(tmp_path, max_epochs=2).fit(model, datamodule=_datamodule(widget_root))
    assert _training_images(calls) == 2 * N_TRAIN
    assert len(model.feature_cache) == 0
    assert model.model.router.fitted("0") and model.model.thresholds.fitted("0")  # from a pass over the loaders

