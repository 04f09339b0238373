"""Orthogonal Gradient Projection callback: subspace algebra, V4 switch-off, real model, state."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch, ImageItem
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset
from torchvision.tv_tensors import Image

from anomalib_moleflow.callbacks import OrthogonalGradientProjection
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.gaussian import pool_features

#: The model of these tests: EfficientNet-Lite0 without pretrained weights at 64 px, two coupling
#: blocks, rank-2 LoRA (the other fields at their defaults).
CONFIG = {
    "features": {"backbone": "tf_efficientnet_lite0", "pre_trained": False, "image_size": 64},
    "flow": {"n_coupling_blocks": 2},
    "experts": {"lora_rank": 2},
}


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


def _relative_overlap(basis: torch.Tensor, g: torch.Tensor) -> float:
    return ((basis.T.double() @ g.double().reshape(-1)).abs().max() / g.double().norm()).item()


def test_projection_is_orthogonal_to_both_tasks_subspaces() -> None:
    d = 60
    u1, u2 = _orthonormal(d, 3, seed=0), _orthonormal(d, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    ogp = OrthogonalGradientProjection(threshold=0.999, max_rank_per_task=10)
    # each task's per-sample gradients live in its own (non-orthogonal) low-rank subspace
    assert ogp.add_task_gradients("w", (torch.randn(40, 3, generator=g, dtype=torch.float64) @ u1.T).float()) == 3
    assert ogp.add_task_gradients("w", (torch.randn(40, 2, generator=g, dtype=torch.float64) @ u2.T).float()) == 2
    basis = ogp.bases["w"]
    assert basis.shape == (d, 5) and ogp.ranks["w"] == [3, 2]
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    grad = torch.randn(6, 10, generator=g)
    projected = ogp.project("w", grad)
    assert _relative_overlap(basis, projected) < 1e-5
    assert _relative_overlap(u1, projected) < 1e-5
    assert _relative_overlap(u2, projected) < 1e-5
    # a gradient already inside a stored subspace adds nothing new
    assert ogp.add_task_gradients("w", (torch.randn(10, 3, generator=g, dtype=torch.float64) @ u1.T).float()) == 0


def test_rank_follows_energy_threshold_and_cap() -> None:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.01])
    grads = (torch.randn(50, 5, generator=g) * scales) @ _orthonormal(30, 5, seed=3).T.float()
    # energy shares ~ 0.79, 0.2, 0.008, 8e-7, 8e-9
    assert OrthogonalGradientProjection(threshold=0.7).add_task_gradients("w", grads) == 1
    assert OrthogonalGradientProjection(threshold=0.95).add_task_gradients("w", grads) == 2
    assert OrthogonalGradientProjection(threshold=0.9995).add_task_gradients("w", grads) == 3
    assert OrthogonalGradientProjection(threshold=1.0, max_rank_per_task=4).add_task_gradients("w", grads) == 4


def test_state_round_trip() -> None:
    ogp = OrthogonalGradientProjection()
    ogp.add_task_gradients("a.weight", torch.randn(20, 12))
    ogp.add_task_gradients("b.bias", torch.randn(20, 3))
    ogp.n_tasks = 1
    buffer = io.BytesIO()
    torch.save({"cb": ogp.state_dict()}, buffer)
    buffer.seek(0)
    fresh = OrthogonalGradientProjection()
    fresh.load_state_dict(torch.load(buffer, weights_only=True)["cb"])
    assert fresh.n_tasks == 1 and fresh.ranks == ogp.ranks
    assert fresh.bases.keys() == ogp.bases.keys()
    assert all(torch.equal(fresh.bases[k], ogp.bases[k]) for k in ogp.bases)
    grad = torch.randn(12)
    assert torch.equal(fresh.project("a.weight", grad), ogp.project("a.weight", grad))


# ----------------------------------------------------------------- with the real model
class _Images(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.images = torch.rand(n, 3, 72, 72, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageItem:
        return ImageItem(image=Image(self.images[index]), image_path=f"/task{self.seed}/{index}.png")


def _module(**overrides: object) -> MoLEFlow:
    torch.manual_seed(0)
    cfg = MoLEFlowConfig.from_dict(CONFIG).updated(overrides)
    module = MoLEFlow(cfg, evaluator=False, visualizer=False, post_processor=False)
    module.setup("fit")
    return module


def _trainer(seed: int, n: int = 6) -> SimpleNamespace:
    """The one thing the callback (through ``MoLEFlow.training_features``) reads from the trainer:
    its training dataloader."""
    return SimpleNamespace(train_dataloader=DataLoader(_Images(n, seed), batch_size=3, collate_fn=ImageBatch.collate))


def _attach(module: MoLEFlow, seed: int) -> SimpleNamespace:
    """Attach a stand-in trainer for task ``seed`` (what ``Trainer.fit`` does) and return it."""
    trainer = _trainer(seed)
    module.trainer = trainer  # type: ignore[assignment]
    return trainer


def _backward(module: MoLEFlow, trainer: SimpleNamespace) -> None:
    module.zero_grad()
    batch = next(iter(trainer.train_dataloader))
    features = module.model.extract_features(module.pre_processor.transform(batch.image))
    loss, _ = module.loss(*module.model.flow_forward(features))
    loss.backward()


def test_disabled_with_a_warning_when_nothing_shared_trains() -> None:
    """Default (V4.1) config: task 1 trains no shared parameter."""
    module = _module()
    ogp = OrthogonalGradientProjection(n_samples=3)
    module.model.prepare_task_training("0")
    trainer = _attach(module, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ogp.on_train_start(trainer, module)  # task 0 trains shared parameters: no warning
    assert {group for group, _, _ in ogp._protected} == {"base", "mixer", "context"}  # noqa: SLF001
    ogp.on_train_end(trainer, module)  # all shared groups freeze after task 0: nothing stored
    assert ogp.bases == {} and ogp.n_tasks == 0
    module.add_task()
    module.model.prepare_task_training("1")
    trainer = _attach(module, 1)
    with pytest.warns(UserWarning, match="nothing to protect"):
        ogp.on_train_start(trainer, module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ogp.on_train_start(trainer, module)  # warns once only
    _backward(module, trainer)
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    assert grads  # the expert's own parameters have gradients
    ogp.on_after_backward(trainer, module)
    ogp.on_train_end(trainer, module)
    assert all(torch.equal(grads[n], p.grad) for n, p in module.model.named_parameters() if p.grad is not None)
    assert ogp.bases == {}


def test_skip_frozen_groups_off_stores_every_trained_group() -> None:
    """``skip_frozen_groups=False``: task 0's bases cover the base flow too (on a tiny flow this is cheap)."""
    module = _module()
    ogp = OrthogonalGradientProjection(n_samples=2, max_rank_per_task=2, skip_frozen_groups=False)
    module.model.prepare_task_training("0")
    trainer = _attach(module, 0)
    ogp.on_train_start(trainer, module)
    ogp.on_train_end(trainer, module)
    base = {n for n, p in module.model.named_parameters() if any(p is q for q in module.model.shared_parameters()["base"])}
    assert base and base <= set(ogp.bases)
    assert ogp.n_tasks == 1 and all(len(r) == 1 and 0 < r[0] <= 2 for r in ogp.ranks.values())


def test_real_model_gradients_are_projected_away_from_two_tasks() -> None:
    """V3-style config (spatial mixer trains on every task): bases from tasks 0 and 1,
    then task 2's mixer gradients are orthogonal to all of them."""
    module = _module(freeze_mixer_after_task0=False)
    ogp = OrthogonalGradientProjection(n_samples=5)
    for task in range(2):
        if task:
            module.add_task()
        module.model.prepare_task_training(str(task))
        trainer = _attach(module, task)
        ogp.on_train_start(trainer, module)
        ogp.on_train_end(trainer, module)
    mixer = {n for n, _ in module.model.spatial_mixer.named_parameters(prefix="spatial_mixer")}
    assert set(ogp.bases) == mixer  # base flow and context freeze after task 0: no basis
    assert ogp.n_tasks == 2
    name = "spatial_mixer.kernel_logits"
    assert len(ogp.ranks[name]) == 2 and ogp.ranks[name][1] > 0
    module.add_task()
    module.model.prepare_task_training("2")
    trainer = _attach(module, 2)
    ogp.on_train_start(trainer, module)
    _backward(module, trainer)
    param = dict(module.model.named_parameters())[name]
    before = param.grad.clone()
    ogp.on_after_backward(trainer, module)
    assert not torch.allclose(before, param.grad)
    assert _relative_overlap(ogp.bases[name], param.grad) < 1e-5
    assert torch.allclose(param.grad, ogp.project(name, before), atol=1e-6)


def test_lightning_fit_stores_bases_and_router_in_the_checkpoint(tmp_path: Path) -> None:
    """End to end with a real Trainer: hooks fire, the callback's state reaches the checkpoint, and
    the model fits its router prototype itself at the end of training."""
    module = _module(freeze_mixer_after_task0=False)
    ogp = OrthogonalGradientProjection(n_samples=4)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[ogp],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=_trainer(0).train_dataloader)
        trainer.save_checkpoint(tmp_path / "task0.ckpt")
    checkpoint = torch.load(tmp_path / "task0.ckpt", weights_only=True)
    state = checkpoint["callbacks"][ogp.state_key]
    assert state["n_tasks"] == 1 and "spatial_mixer.kernel_logits" in state["bases"]
    restored = OrthogonalGradientProjection()
    restored.load_state_dict(state)
    assert torch.equal(restored.bases["spatial_mixer.kernel_logits"], ogp.bases["spatial_mixer.kernel_logits"])
    assert module.model.router.fitted("0")
    fresh = _module(freeze_mixer_after_task0=False)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.model.router.task_keys == ["0"] and fresh.model.router.fitted("0")
    pooled = torch.randn(3, fresh.model.feature_extractor.total_channels)
    distances = fresh.model.router.distances(pooled)
    assert torch.isfinite(distances).all()
    assert torch.equal(distances, module.model.router.distances(pooled))
    # the prototype is the mean of the training images' pooled features
    images = module.pre_processor.transform(_Images(6, 0).images)
    with torch.no_grad():
        mean = pool_features(module.model.extract_features(images)).double().mean(0)
    torch.testing.assert_close(fresh.model.router.tasks["0"].mean.double(), mean, rtol=1e-5, atol=1e-5)
