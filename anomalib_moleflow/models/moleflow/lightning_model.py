"""MoLE-Flow as an anomalib model (thin Lightning wrapper around :class:`MoLEFlowModel`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_moleflow.backbones import backbone_normalization

from .config import MoLEFlowConfig
from .loss import MoLEFlowLoss
from .torch_model import MoLEFlowModel


class MoLEFlow(AnomalibModule):
    """MoLE-Flow: mixture of LoRA experts on a normalizing flow, for continual anomaly detection.

    Args:
        config: The one configuration object (:class:`MoLEFlowConfig`, or a dict of its
            fields). Defaults to the V4.1 design.
        pre_processor: anomalib pre-processor, or ``True`` for resize to
            ``config.image_size`` and the backbone's own normalisation.
        post_processor: anomalib post-processor or flag.
        evaluator: anomalib evaluator or flag.
        visualizer: anomalib visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib_moleflow import MoLEFlow
        >>> from anomalib_moleflow.data import MVTecADLocal
        >>> model = MoLEFlow()
        >>> Engine(max_epochs=20).train(model, datamodule=MVTecADLocal(root="mvtec_ad", category="bottle"))  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MoLEFlowConfig | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if isinstance(config, dict):
            config = MoLEFlowConfig.from_dict(config)
        config = config or MoLEFlowConfig()
        if pre_processor is True:
            pre_processor = self.configure_moleflow_pre_processor(config)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.hparams["config"] = config.to_dict()  # plain data: loads with weights_only=True
        self.config = config
        self.model = MoLEFlowModel(config)
        self.loss = MoLEFlowLoss(
            tail_weight=config.tail_weight,
            tail_top_ratio=config.tail_top_ratio,
            logdet_reg=config.logdet_reg,
            center_loss_weight=config.center_loss_weight,
            focal_gamma=config.focal_gamma,
        )
        self._feature_cache: dict[str, torch.Tensor] = {}
        self._train_paths: dict[str, None] = {}  # ordered set: training images of this fit

    @staticmethod
    def configure_moleflow_pre_processor(config: MoLEFlowConfig) -> PreProcessor:
        """Resize to ``config.image_size`` and normalise with the backbone's statistics."""
        mean, std = backbone_normalization(config.backbone)
        size = (config.image_size, config.image_size)
        return PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=list(mean), std=list(std))]))

    # ----------------------------------------------------------------- tasks
    def add_task(self) -> str:
        """Add the next task expert to the torch model and return its key."""
        self._feature_cache.clear()
        return self.model.add_task()

    def setup(self, stage: str) -> None:
        """Single-task use: create the first expert when none exists yet."""
        del stage
        if self.model.num_tasks == 0:
            self.add_task()

    def on_fit_start(self) -> None:
        """Features are cached per task: start each fit with an empty cache."""
        self._feature_cache.clear()
        self._train_paths.clear()

    def fit_scoring_statistics(self) -> None:
        """Fit the active expert's scoring statistics (position Gaussian, global score) on this
        fit's training images.

        No-op unless ``config.position_gaussian_weight`` or ``config.global_score_weight`` is > 0. Uses the feature cache when every
        training image is in it, otherwise one pass over the training dataloader.
        """
        key = self.model.active_task
        nothing_to_fit = self.model.global_score is None and self.model.position_gaussian is None
        if nothing_to_fit or key is None or self._trainer is None:
            return
        from anomalib_moleflow.callbacks.router_fit import eval_mode, iter_train_features

        with eval_mode(self):
            if self._train_paths and all(p in self._feature_cache for p in self._train_paths):
                paths = list(self._train_paths)
                device = self.device
                chunks = (
                    torch.stack([self._feature_cache[p] for p in paths[i : i + 32]]).to(device)
                    for i in range(0, len(paths), 32)
                )
                self.model.fit_scoring_statistics(key, chunks)
            else:
                self.model.fit_scoring_statistics(key, (f for _, f in iter_train_features(self.trainer, self)))

    def on_validation_epoch_start(self) -> None:
        """Inside fit, refresh the scoring statistics so validation scores are final-form."""
        if self._trainer is not None and self.trainer.state.fn == "fit" and self._train_paths:
            self.fit_scoring_statistics()

    def on_train_end(self) -> None:
        """Fit the scoring statistics of the trained expert."""
        self.fit_scoring_statistics()

    # ----------------------------------------------------------------- steps
    def _cached_features(self, batch: Batch) -> torch.Tensor:
        """Backbone features, computed once per image per fit when caching is on.

        The backbone is frozen and pre-processing is deterministic, so during one fit an
        image's features never change: each training (and validation) image goes through
        the backbone once per task instead of once per epoch.
        """
        paths = getattr(batch, "image_path", None)
        if not self.config.cache_features or paths is None:
            return self.model.extract_features(batch.image)
        paths = [str(p) for p in paths]
        if all(p in self._feature_cache for p in paths):
            return torch.stack([self._feature_cache[p] for p in paths]).to(batch.image.device)
        features = self.model.extract_features(batch.image)
        for path, feat in zip(paths, features, strict=True):
            self._feature_cache[path] = feat.detach().cpu()
        return features

    def _train_features(self, batch: Batch) -> torch.Tensor:
        """Features of a training batch (cached per fit)."""
        for path in getattr(batch, "image_path", None) or ():
            self._train_paths[str(path)] = None
        return self._cached_features(batch)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """NLL (+ tail and regularisers) of the active expert on one batch."""
        del args, kwargs
        features = self._train_features(batch)
        z, log_jac_det = self.model.flow_forward(features)
        loss, parts = self.loss(z, log_jac_det)
        loss = loss + self.model.regularization()
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=len(features))
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_epoch=True, on_step=False, logger=True, batch_size=len(features))
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch with the active expert."""
        del args, kwargs
        in_fit = self._trainer is not None and self.trainer.state.fn == "fit"
        if in_fit:  # validation inside fit: the same images every epoch, features cached
            predictions = self.model.predict_features(self._cached_features(batch))
        else:
            predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the active task's trainable parameters, cosine schedule with warm-up."""
        key = self.model.active_task
        params = self.model.prepare_task_training(key)
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        max_epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        warmup = int(total * self.config.warmup_epochs / max_epochs)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping from the config; no sanity validation."""
        return {"gradient_clip_val": self.config.grad_clip, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which experts exist so loading can rebuild them first."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["moleflow_task_keys"] = list(self.model.task_keys)
        checkpoint["moleflow_active_task"] = self.model.active_task

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Recreate the saved experts before Lightning loads the state dict."""
        super().on_load_checkpoint(checkpoint)
        keys = checkpoint.get("moleflow_task_keys", [])
        while self.model.num_tasks < len(keys):
            self.model.add_task()
        active = checkpoint.get("moleflow_active_task")
        if active is not None:
            self.model.set_task(active)
