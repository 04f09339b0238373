"""Task routers on synthetic Gaussian tasks: accuracy, hybrid stage 2, unknown flag, state."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch, ImageItem
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.tv_tensors import Image

from anomalib_moleflow.callbacks import RouterFitCallback
from anomalib_moleflow.continual.routers import (
    UNKNOWN,
    PrototypeRouter,
    TwoStageHybridRouter,
    ledoit_wolf_covariance,
    pool_features,
)
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig

DIM = 32


def _task(seed: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler parameters of one synthetic task: mean and a random mixing matrix."""
    g = torch.Generator().manual_seed(seed)
    mean = shift * torch.randn(DIM, generator=g) / DIM**0.5
    mix = torch.randn(DIM, DIM, generator=g) * (0.3 + torch.rand(DIM, generator=g))
    return mean, mix / DIM**0.5


def _sample(task: tuple[torch.Tensor, torch.Tensor], n: int, seed: int) -> torch.Tensor:
    mean, mix = task
    return mean + torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) @ mix.T


TASKS = [_task(seed, shift=4.0) for seed in range(3)]


def _fitted(n_train: int = 200, **kwargs: float | int | None) -> PrototypeRouter:
    router = PrototypeRouter(**kwargs)
    for t, task in enumerate(TASKS):
        router.fit_task(str(t), _sample(task, n_train, seed=100 + t))
    return router


def _held_out(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([_sample(task, n, seed=1000 + t) for t, task in enumerate(TASKS)])
    return x, torch.arange(len(TASKS)).repeat_interleave(n)


def test_pool_features_averages_the_grid() -> None:
    features = torch.randn(2, 3, 4, 5)
    assert torch.allclose(pool_features(features), features.reshape(2, 12, 5).mean(1))
    with pytest.raises(ValueError, match="B, H, W, C"):
        pool_features(torch.randn(2, 5))


def test_ledoit_wolf_is_positive_definite_with_fewer_samples_than_channels() -> None:
    x = torch.randn(10, 40, dtype=torch.float64)
    cov = ledoit_wolf_covariance(x - x.mean(0))
    assert torch.linalg.eigvalsh(cov).min() > 0


@pytest.mark.parametrize("n_train", [200, 20])
def test_prototype_router_is_perfect_on_separable_tasks(n_train: int) -> None:
    """Also with N < C (20 images, 32 channels), where the plain covariance is singular."""
    router = _fitted(n_train)
    x, labels = _held_out()
    assert router.task_keys == ["0", "1", "2"]
    assert router.distances(x).shape == (len(x), 3)
    assert torch.equal(router(x), labels)
    assert router.route_keys(x[:1]) == ["0"]


def test_mahalanobis_beats_euclidean_on_anisotropic_tasks() -> None:
    wide = torch.randn(500, DIM) * torch.tensor([10.0] + [0.5] * (DIM - 1))
    narrow = torch.randn(500, DIM) * 0.5 + torch.tensor([12.0] + [0.0] * (DIM - 1))
    router = PrototypeRouter()
    router.fit_task("0", wide)
    router.fit_task("1", narrow)
    probe = torch.zeros(1, DIM)
    probe[0, 0] = -9.0  # far out in the wide task's long axis
    probe2 = torch.zeros(1, DIM)
    probe2[0, 0] = 7.0  # euclidean-closer to the narrow task's mean (12) than to 0
    assert router(torch.cat([probe, probe2])).tolist() == [0, 0]


def test_unknown_flag_is_off_by_default_and_flags_only_far_products() -> None:
    far = _sample((torch.full((DIM,), 6.0), torch.eye(DIM) * 0.5), 200, seed=7)
    x, labels = _held_out(500)
    router = _fitted()
    assert router.unknown_threshold is None
    assert (router(far) >= 0).all()
    router.unknown_threshold = 1.5  # switchable after fitting
    assert (router(far) == UNKNOWN).all()
    assert torch.equal(router(x), labels)  # no held-out in-distribution image is flagged
    calib = router.calibrations()
    assert calib.shape == (3,) and (calib > 0).all()


def test_unfitted_slots_are_never_chosen() -> None:
    router = _fitted()
    router.ensure_tasks(["3"])
    x, labels = _held_out(50)
    assert torch.isinf(router.distances(x)[:, 3]).all()
    assert torch.equal(router(x), labels)
    empty = PrototypeRouter(channels=DIM)
    empty.ensure_tasks(["0"])
    with pytest.raises(RuntimeError, match="fit_task"):
        empty(x)


def test_state_dict_round_trip_into_a_fresh_router() -> None:
    router = _fitted(unknown_threshold=2.0)
    x, _ = _held_out(20)
    buffer = io.BytesIO()
    torch.save(router.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = PrototypeRouter(unknown_threshold=2.0)  # slots are created by load_state_dict itself
    fresh.load_state_dict(state)
    assert fresh.task_keys == router.task_keys
    assert torch.equal(fresh.distances(x), router.distances(x))
    assert torch.equal(fresh.calibrations(), router.calibrations())
    explicit = PrototypeRouter()
    explicit.ensure_tasks(router.task_keys, channels=DIM)
    explicit.load_state_dict(state)
    assert torch.equal(explicit.distances(x), router.distances(x))


def test_router_inside_a_parent_module_survives_its_state_dict() -> None:
    parent = nn.Module()
    parent.router = TwoStageHybridRouter()
    for t, task in enumerate(TASKS):
        parent.router.fit_task(t, _sample(task, 100, seed=t))
    fresh = nn.Module()
    fresh.router = TwoStageHybridRouter()
    fresh.load_state_dict(parent.state_dict())
    x, _ = _held_out(10)
    assert torch.equal(fresh.router.distances(x), parent.router.distances(x))


def _label_score_fn(calls: list[tuple[str, int]]):  # noqa: ANN202
    """Fake expert: patch NLL is small where feature channel 0 equals the task index."""

    def score_fn(features: torch.Tensor, key: str) -> torch.Tensor:
        calls.append((key, len(features)))
        return (features[..., 0] - float(key)) ** 2

    return score_fn


def test_hybrid_router_resolves_ambiguous_prototypes_with_likelihood() -> None:
    """Tasks 0/1 share one prototype cluster, tasks 2/3 another: stage 1 cannot tell the
    pairs apart, stage 2 (the experts' likelihood) must, with per-image candidates."""
    cluster_a, cluster_b = _sample(TASKS[0], 200, seed=1), _sample(TASKS[1], 200, seed=2)
    router = TwoStageHybridRouter(top_k=2)
    for key, data in (("0", cluster_a), ("1", cluster_a), ("2", cluster_b), ("3", cluster_b)):
        router.fit_task(key, data)
    labels = torch.tensor([0, 1, 2, 3, 1, 3, 0, 2])
    pooled = torch.stack([_sample(TASKS[0] if t < 2 else TASKS[1], 1, seed=50 + i)[0] for i, t in enumerate(labels)])
    features = torch.zeros(len(labels), 2, 2, 3)
    features[..., 0] = labels.float()[:, None, None]
    calls: list[tuple[str, int]] = []
    assert torch.equal(router(pooled, features, _label_score_fn(calls)), labels)
    assert sorted(calls) == [("0", 4), ("1", 4), ("2", 4), ("3", 4)]  # one call per expert, own images only
    prototype_only = router.prototype(pooled)
    assert not torch.equal(prototype_only, labels)  # stage 1 alone is ambiguous
    calls.clear()
    assert torch.equal(router(pooled, features, _label_score_fn(calls), top_k=1), prototype_only)
    assert calls == []


def test_hybrid_router_keeps_the_unknown_flag() -> None:
    router = TwoStageHybridRouter(unknown_threshold=1.5)
    for t, task in enumerate(TASKS):
        router.fit_task(str(t), _sample(task, 200, seed=t))
    far = _sample((torch.full((DIM,), 6.0), torch.eye(DIM) * 0.5), 4, seed=7)
    features = torch.zeros(4, 2, 2, 3)
    assert (router(far, features, _label_score_fn([])) == UNKNOWN).all()


# ----------------------------------------------------------------- RouterFitCallback
class _Images(Dataset):
    def __init__(self, n: int, seed: int, low: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = low + 0.5 * torch.rand(n, 3, 72, 72, generator=g)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageItem:
        return ImageItem(image=Image(self.images[index]), image_path=f"/task{self.seed}/{index}.png")


def _trainer(dataset: Dataset) -> SimpleNamespace:
    """The one thing the callback reads from the trainer: its training dataloader."""
    return SimpleNamespace(train_dataloader=DataLoader(dataset, batch_size=4, collate_fn=ImageBatch.collate))


def test_router_fit_callback_fits_each_task_on_preprocessed_images() -> None:
    torch.manual_seed(0)
    cfg = MoLEFlowConfig(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=64, n_coupling_blocks=2)
    module = MoLEFlow(cfg, evaluator=False, visualizer=False, post_processor=False)
    module.setup("fit")
    RouterFitCallback().on_train_end(_trainer(_Images(2, 0, 0.0)), module)  # no router: no-op
    router = PrototypeRouter()
    module.model.router = router
    fitted: list[tuple[str, torch.Tensor]] = []
    fit_task = router.fit_task
    router.fit_task = lambda key, pooled: (fitted.append((key, pooled)), fit_task(key, pooled))
    tasks = [_Images(10, 0, low=0.0), _Images(10, 1, low=0.5)]  # dark product, bright product
    module.train()
    for t, images in enumerate(tasks):
        if t:
            module.add_task()
        RouterFitCallback().on_train_end(_trainer(images), module)
        assert module.training  # the callback restores the training mode
    assert router.task_keys == ["0", "1"] and [k for k, _ in fitted] == ["0", "1"]
    with torch.no_grad():
        raw = tasks[0].images
        expected = pool_features(module.model.extract_features(module.pre_processor.transform(raw)))
        unprocessed = pool_features(module.model.extract_features(raw))
    assert not torch.allclose(unprocessed, expected, atol=1e-3)  # pre-processing matters here
    assert fitted[0][1].shape == (10, module.model.feature_extractor.total_channels)
    assert torch.allclose(fitted[0][1], expected, atol=1e-5)
    with torch.no_grad():
        fresh = torch.cat([_Images(5, 7, 0.0).images, _Images(5, 8, 0.5).images])
        pooled = pool_features(module.model.extract_features(module.pre_processor.transform(fresh)))
    assert router(pooled).tolist() == [0] * 5 + [1] * 5
