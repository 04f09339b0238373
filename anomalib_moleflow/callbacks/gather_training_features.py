"""Under DDP, every process fits the task's statistics from all training images, not its share."""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer


class GatherTrainingFeatures(Callback):
    """Before the model fits the task's statistics (its ``on_train_end`` runs after the callbacks'),
    give every process the cached training features of all processes, in rank order (duplicates
    that a distributed sampler pads with are dropped). Does nothing in a single process."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather the feature caches of all processes into each one."""
        if trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        cache = pl_module.feature_cache
        if not pl_module.config.features.cache_features:
            msg = "trainer.strategy ddp needs model.config.features.cache_features true (statistics from every process's images)"
            raise ValueError(msg)
        shares: list[list | None] = [None] * trainer.world_size
        dist.all_gather_object(shares, cache.training_items())
        merged: dict[str, object] = {}
        for share in shares:
            for path, features in share or []:
                merged.setdefault(path, features)
        cache.replace_training(list(merged.items()))
