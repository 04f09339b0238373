"""Fit the task router on the training images once a task has been learned."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_moleflow.continual.routers import pool_features


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _first_loader(loaders: Any) -> Any:  # noqa: ANN401
    """The dataloader behind ``trainer.train_dataloader`` (first one if several)."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _preprocessed(batch: Any, pl_module: LightningModule) -> Any:  # noqa: ANN401
    """Copy of ``batch`` on the module's device with the pre-processor's transform applied,
    as anomalib's ``PreProcessor.on_train_batch_start`` would do during training."""
    image = batch.image.to(pl_module.device)
    pre_processor = getattr(pl_module, "pre_processor", None)
    transform = getattr(pre_processor, "transform", None)
    if transform is not None:
        image = transform(image)
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, image=image)
    batch = copy.copy(batch)
    batch.image = image
    return batch


def iter_train_features(
    trainer: Trainer, pl_module: LightningModule, max_images: int | None = None
) -> Iterator[tuple[Any, torch.Tensor]]:
    """Yield ``(batch, features)`` over the training set, ``features`` being the
    ``(B, H, W, C)`` backbone features from ``pl_module._train_features`` (feature cache),
    computed without gradients. Stops once ``max_images`` images have been yielded."""
    loader = _first_loader(trainer.train_dataloader)
    if loader is None:
        return
    seen = 0
    for raw in loader:
        batch = _preprocessed(raw, pl_module)
        with torch.no_grad():
            features = pl_module._train_features(batch)  # noqa: SLF001
        if max_images is not None:
            features = features[: max_images - seen]
        yield batch, features
        seen += len(features)
        if max_images is not None and seen >= max_images:
            return


class RouterFitCallback(Callback):
    """At the end of each task's training, fit ``pl_module.model.router`` (if any) on the
    pooled backbone features of that task's training images.

    Args:
        max_images: Use at most this many training images (all when ``None``).
    """

    def __init__(self, max_images: int | None = None) -> None:
        self.max_images = max_images

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pool the task's training features and fit its prototype."""
        model = pl_module.model
        router = getattr(model, "router", None)
        if router is None or model.active_task is None:
            return
        with eval_mode(pl_module):
            pooled = [pool_features(f).detach() for _, f in iter_train_features(trainer, pl_module, self.max_images)]
        if not pooled:
            return
        router.fit_task(model.active_task, torch.cat(pooled))
