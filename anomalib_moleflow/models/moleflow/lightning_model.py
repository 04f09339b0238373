"""MoLE-Flow as an anomalib model (thin Lightning wrapper around :class:`MoLEFlowModel`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_moleflow.io import safe_torch_load, verify_digest

from .checkpoint_format import lightning_checkpoint, saved_settings
from .config import MoLEFlowConfig
from .feature_cache import FeatureCache
from .inference_batch import RoutedInferenceBatch
from .loss import MoLEFlowLoss
from .numerics import NonFiniteSteps
from .post_processing import (
    NormalizedScorePostProcessor,
    normalized_score_post_processor,
)
from .pre_processing import moleflow_pre_processor, prepare_batch
from .torch_model import MoLEFlowModel
from .training_stages import (
    Stage,
    drop_other_stages,
    fast_epochs,
    parameter_groups,
    stage_of_epoch,
)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class MoLEFlow(AnomalibModule):
    """MoLE-Flow: mixture of LoRA experts on a normalizing flow, for continual anomaly detection.

    Args:
        config: The one configuration object (:class:`MoLEFlowConfig`, or a dict of its groups).
            Defaults to the V4.1 design.
        pre_processor: anomalib pre-processor, or ``True`` for resize to the configured image
            size and the backbone's own normalisation.
        post_processor: anomalib post-processor or flag.
        evaluator: anomalib evaluator or flag.
        visualizer: anomalib visualizer or flag.
        normalize_scores: Score each task on its own scale (its thresholds fitted at the end of its
            training, threshold at 0.5): what a continual model that routes among products needs.
            The default post-processor then only thresholds at 0.5. ``False`` (single-product use):
            raw scores, normalised by anomalib's post-processor.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib_moleflow import MoLEFlow
        >>> from anomalib_moleflow.data import MVTecADLocal
        >>> model = MoLEFlow()
        >>> Engine(max_epochs=20).train(model, datamodule=MVTecADLocal(root="mvtec_ad", category="bottle"))  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MoLEFlowConfig | dict[str, Any] | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        normalize_scores: bool = False,
    ) -> None:
        if isinstance(config, dict):
            config = MoLEFlowConfig.from_dict(config)
        config = config or MoLEFlowConfig()
        self.normalize_scores = normalize_scores  # read by configure_post_processor during super().__init__
        default_pre_processor = pre_processor is True
        if default_pre_processor:
            pre_processor = self.configure_moleflow_pre_processor(config)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.hparams["config"] = config.to_dict()  # plain data: loads with weights_only=True
        self.config = config
        self.model = MoLEFlowModel(config, normalize_scores=normalize_scores)
        self.loss = self._build_loss(config)
        self.feature_cache = FeatureCache()
        self.non_finite_steps = NonFiniteSteps()
        self._default_pre_processor = default_pre_processor
        """Whether the pre-processor is the one built from the config (rebuilt with it on loading)."""

    @staticmethod
    def _build_loss(config: MoLEFlowConfig) -> MoLEFlowLoss:
        loss = config.loss
        return MoLEFlowLoss(
            tail_weight=loss.tail_weight,
            tail_top_ratio=loss.tail_top_ratio,
            logdet_reg=loss.logdet_reg,
            center_loss_weight=loss.center_loss_weight,
            focal_gamma=loss.focal_gamma,
        )

    @staticmethod
    def configure_moleflow_pre_processor(config: MoLEFlowConfig) -> PreProcessor:
        """Resize to the configured image size and normalise with the backbone's statistics."""
        return moleflow_pre_processor(config)

    def configure_post_processor(self) -> PostProcessor | None:
        """anomalib's one-class post-processor, or pass-through thresholding at 0.5 when the model
        normalises scores per task itself."""
        if self.normalize_scores:
            return normalized_score_post_processor()
        return super().configure_post_processor()

    # ----------------------------------------------------------------- tasks
    def add_task(self, name: str | None = None) -> str:
        """Add the next task expert to the torch model and return its key."""
        self.feature_cache.clear()
        return self.model.add_task(name)

    def setup(self, stage: str) -> None:
        """Single-task use: create the first expert when none exists yet. Inside a trainer,
        checkpoints load through :class:`ContinualCheckpointIO` (``--ckpt_path`` of any format)."""
        del stage
        if self.model.num_tasks == 0:
            self.add_task()
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is not None and not isinstance(strategy.checkpoint_io, ContinualCheckpointIO):
            strategy.checkpoint_io = ContinualCheckpointIO(strategy.checkpoint_io)

    def on_fit_start(self) -> None:
        """Features are cached per task: start each fit with an empty cache (and no skipped steps)."""
        self.feature_cache.clear()
        self.non_finite_steps.reset()

    def on_validation_epoch_start(self) -> None:
        """Inside fit, refresh the training statistics so validation scores are final-form."""
        if self._trainer is not None and self.trainer.state.fn == "fit" and self.feature_cache.has_training:
            with eval_mode(self):
                self.model.fit_task_statistics(self.model.active_task, list(self.training_features()))

    def on_train_end(self) -> None:
        """The end of a task: fit the trained expert's per-task statistics."""
        self.fit_task_statistics()

    # ----------------------------------------------------------------- per-task statistics
    @torch.no_grad()
    def fit_task_statistics(self) -> None:
        """Fit every per-task statistic of the active expert: router prototype, position Gaussian and
        global score from this fit's training images, then score normalisation and thresholds from the
        validation images (when the data has a validation split)."""
        key = self.model.active_task
        if key is None or self._trainer is None:
            return
        with eval_mode(self):
            chunks = list(self.training_features())
            if chunks:
                self.model.fit_task_statistics(key, chunks)
            validation = self._validation_scores(key)
            if validation is not None:
                self.model.fit_task_thresholds(key, *validation)

    def training_features(self, max_images: int | None = None) -> Iterator[torch.Tensor]:
        """Backbone features ``(b, H, W, C)`` of this fit's training images, without gradients: from
        the feature cache when it holds them all, else one pass over the training dataloader."""
        if self.feature_cache.holds_all_training:
            yield from self.feature_cache.training_chunks(self.device, max_images=max_images)
            return
        loader = _first_loader(self.trainer.train_dataloader) if self._trainer is not None else None
        if loader is None:
            return
        seen = 0
        for raw in loader:
            images = self.prepare_images(raw.image.to(self.device))
            with torch.no_grad():
                features = self._train_features(_with_image(raw, images))
            if max_images is not None:
                features = features[: max_images - seen]
            yield features
            seen += len(features)
            if max_images is not None and seen >= max_images:
                return

    def _validation_scores(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Raw oracle scores ``(N,)``, maps ``(N, H, W)``, labels and masks of the validation split."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None and hasattr(datamodule, "val_dataloader") else None
        if loader is None:
            return None
        scores, maps, labels, masks = [], [], [], []
        with self.model.oracle(key), self.model.raw_scores():
            for batch in loader:
                images, mask = self.prepare_batch(batch)
                pred = self.model.predict_features(self._cached_features(batch, images))
                scores.append(pred.pred_score.cpu())
                maps.append(pred.anomaly_map[:, 0].cpu())
                labels.append(batch.gt_label.cpu().long())
                if mask is not None:
                    masks.append(mask)
        if not scores:
            return None
        return torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks) if masks else None

    # ----------------------------------------------------------------- pre-processing
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """The pre-processor's transform of raw ``(B, 3, H, W)`` images (as in training)."""
        return prepare_batch(self.pre_processor, images.to(self.device), None, self.model.anomaly_map_generator.input_size)[0]

    def prepare_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-processed images of a raw batch, and its boolean ``(B, H, W)`` masks at the input size."""
        size = self.model.anomaly_map_generator.input_size
        return prepare_batch(self.pre_processor, batch.image.to(self.device), batch.gt_mask, size)

    # ----------------------------------------------------------------- steps
    def _cached_features(self, batch: Batch, images: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone features of ``images`` (default ``batch.image``), computed once per image per fit
        when caching is on."""
        images = batch.image if images is None else images
        paths = getattr(batch, "image_path", None)
        if not self.config.features.cache_features or paths is None:
            return self.model.extract_features(images)
        return self.feature_cache.get(paths, images, self.model.extract_features)

    def _train_features(self, batch: Batch) -> torch.Tensor:
        """Features of a training batch (cached per fit)."""
        self.feature_cache.record_training(getattr(batch, "image_path", None) or ())
        return self._cached_features(batch)

    def flow_loss(self, features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the active expert's flow on ``features`` and its parts (without the adapter regulariser)."""
        z, log_jac_det = self.model.flow_forward(features)
        return self.loss(z, log_jac_det)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """NLL (+ tail and regularisers) of the active expert on one batch."""
        del args, kwargs
        features = self._train_features(batch)
        loss, parts = self.flow_loss(features)
        loss = loss + self.model.regularization()
        if not torch.isfinite(loss):  # skip the step (Lightning does not step on None), count it
            self._record_step(finite=False)
            return None
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=len(features))
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_epoch=True, on_step=False, logger=True, batch_size=len(features))
        return {"loss": loss}

    def on_train_epoch_end(self) -> None:
        """Log the context branch's strength once per epoch (``context_alpha/block_<i>`` of
        Baseline 1.5, ``gate_*/block_<i>`` of Baseline 2.0's last training batch, and their
        summaries; :meth:`MoLEFlowModel.context_statistics`), when the trainer has a logger."""
        if self._trainer is None or not self.trainer.loggers:
            return
        for name, value in self.model.context_statistics().items():
            self.log(name, value, on_step=False, on_epoch=True, logger=True, sync_dist=True)

    def training_stage(self) -> Stage:
        """The stage this epoch trains in (``optim.training_stages``, :mod:`.training_stages`)."""
        key = self.model.active_task
        first = key is None or self.model.task_keys.index(key) == 0
        return stage_of_epoch(first, self.current_epoch, self._max_epochs(), self.config.optim.fast_epochs_ratio)

    def _max_epochs(self) -> int:
        """The trainer's ``max_epochs`` (at least 1; 1 without a trainer)."""
        return max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Only the running stage's parameters step (``optim.training_stages``). A step whose
        gradients are not finite is skipped too (its gradients dropped), and counted."""
        if self.config.optim.training_stages != "single":
            drop_other_stages(optimizer.param_groups, self.training_stage())
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(torch.isfinite(p.grad).all() for p in params)
        if not finite:
            for p in params:
                p.grad = None
        self._record_step(finite)

    def _record_step(self, finite: bool) -> None:
        """Count the step; stop the task once too many in a row were not finite."""
        self.non_finite_steps.record(finite, self.current_epoch, self.global_step)
        name = self.model.task_names[self.model.task_keys.index(self.model.active_task)]
        self.non_finite_steps.check(f"{self.model.active_task} ('{name}')", self.config.optim.lr)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch with the active expert."""
        del args, kwargs
        in_fit = self._trainer is not None and self.trainer.state.fn == "fit"
        if in_fit:  # validation inside fit: the same images every epoch, features cached
            predictions = self.model.predict_features(self._cached_features(batch))
        else:
            predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> RoutedInferenceBatch:
        """Pre-processor, model, post-processor (as anomalib's), keeping the routed expert ``pred_task``."""
        del args, kwargs
        images = self.pre_processor(batch) if self.pre_processor else batch
        predictions = self.model(images)
        if self.post_processor and isinstance(predictions, RoutedInferenceBatch):
            post = self.post_processor(predictions)
            predictions = RoutedInferenceBatch.routed(post, predictions.pred_task)
        return predictions

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the active task's trainable parameters, cosine schedule with warm-up; with
        ``optim.training_stages="base_fast_slow"`` a later task's expert and shared parameters are
        two groups (fast and slow learning rate), stepped in turn, each stage on its own cosine."""
        key = self.model.active_task
        params = self.model.prepare_task_training(key)
        optim = self.config.optim
        if optim.training_stages == "base_fast_slow":
            params = parameter_groups(self.model, key, optim.lr, optim.slow_lr_ratio)
        optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        max_epochs = self._max_epochs()
        warmup = int(total * optim.warmup_epochs / max_epochs)
        slow_start: int | None = None  # the step the slow stage starts at
        if optim.training_stages == "base_fast_slow" and self.model.task_keys.index(key) > 0 and max_epochs > 1:
            slow_start = int(total * fast_epochs(max_epochs, optim.fast_epochs_ratio) / max_epochs)

        def schedule(step: int) -> float:
            if slow_start is not None and step >= slow_start:  # the slow stage: a cosine of its own, no warm-up
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - slow_start) / max(1, total - slow_start))))
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, (total if slow_start is None else slow_start) - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping from the config; no sanity validation."""
        return {"gradient_clip_val": self.config.optim.grad_clip, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    # ----------------------------------------------------------------- export
    def to_onnx(
        self, export_root: Path | str, model_file_name: str = "model", input_size: tuple[int, int] | None = None, **kwargs: Any
    ) -> Path:
        """One ONNX graph for the whole model (:mod:`.export`): antialiased resize, router, every
        expert, per-product normalisation and thresholds; outputs anomalib's four and ``pred_task``,
        product names in the metadata. ``anomalib export`` and ``to_openvino`` use it."""
        from anomalib.deploy.export import ExportType
        from anomalib.models.components.base.export_mixin.utils import (
            create_export_root,
        )

        from .export import export_onnx

        path = create_export_root(export_root, ExportType.ONNX) / f"{model_file_name}.onnx"
        return export_onnx(self, path, tuple(input_size) if input_size is not None else None, **kwargs)

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> MoLEFlow:
        """Lightning's loader (``anomalib export --ckpt_path``); a continual checkpoint of format 1,
        which has no Lightning keys, loads through :meth:`from_checkpoint`."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except KeyError as exc:
            if exc.args != ("pytorch-lightning_version",):
                raise
            return cls.from_checkpoint(checkpoint_path)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **components: Any) -> MoLEFlow:
        """The one loader: a MoLE-Flow model, in eval mode, from any checkpoint the project writes
        (``anomalib fit``, a continual run's task checkpoint of any format), loaded with
        ``weights_only=True``. Continual models route among their experts and score each task on
        its own scale (threshold 0.5).

        Args:
            path: Checkpoint file.
            **components: ``pre_processor``, ``evaluator``, ``visualizer`` overrides.
        """
        checkpoint = safe_torch_load(path)
        verify_digest(checkpoint, path)
        settings = saved_settings(checkpoint, path)
        model = cls(
            config=settings.config,
            normalize_scores=settings.normalize_scores,
            post_processor=settings.has_post_processor,
            **components,
        )
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        if model.post_processor is None and settings.normalize_scores:
            model.post_processor = normalized_score_post_processor()
        return model.eval()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's model settings (``anomalib test|predict|export --ckpt_path`` builds
        the module from the command line first, and attaches its pre- and post-processor as
        callbacks before loading); the experts are created when the state dict loads."""
        settings = saved_settings(checkpoint)
        if settings.config != self.config or settings.normalize_scores != self.normalize_scores:
            self._rebuild(settings.config, settings.normalize_scores)
        super().on_load_checkpoint(checkpoint)  # a pre-processor saved by anomalib wins over the config's

    def _rebuild(self, config: MoLEFlowConfig, normalize_scores: bool) -> None:
        """Replace the torch model and loss by ones built from ``config``; the default pre-processor
        and post-processor follow it in place (Lightning may hold them as callbacks already)."""
        self.config = config
        self.normalize_scores = normalize_scores
        self.hparams["config"] = config.to_dict()
        self.hparams["normalize_scores"] = normalize_scores
        self.model = MoLEFlowModel(config, normalize_scores=normalize_scores)
        self.loss = self._build_loss(config)
        self.feature_cache.clear()
        if getattr(self, "_default_pre_processor", False) and isinstance(self.pre_processor, PreProcessor):
            built = self.configure_moleflow_pre_processor(config)
            self.pre_processor.transform, self.pre_processor.export_transform = built.transform, built.export_transform
            # anomalib's image datamodules copied the old transform's resize into their datasets at setup
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            update = getattr(datamodule, "_update_augmentations", None)
            if callable(update):
                update()
        if type(self.post_processor) is PostProcessor and normalize_scores:
            # same state, fixed during validation; the loaded state dict sets its values
            self.post_processor.__class__ = NormalizedScorePostProcessor
        elif isinstance(self.post_processor, NormalizedScorePostProcessor) and not normalize_scores:
            self.post_processor.__class__ = PostProcessor


class ContinualCheckpointIO(CheckpointIO):
    """The trainer's checkpoint IO, with continual checkpoints of format 1 given the Lightning keys
    on loading (:func:`~.checkpoint_format.lightning_checkpoint`); saving is unchanged."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """As the wrapped IO."""
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped IO's checkpoint, in the form Lightning reads."""
        return lightning_checkpoint(self.inner.load_checkpoint(path, *args, **kwargs))

    def remove_checkpoint(self, path: Any) -> None:
        """As the wrapped IO."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """As the wrapped IO."""
        self.inner.teardown()


def _first_loader(loaders: Any) -> Any:
    """The dataloader behind ``trainer.train_dataloader`` (first one if several)."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _with_image(batch: Any, image: torch.Tensor) -> Any:
    """Copy of ``batch`` with ``image`` replaced."""
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, image=image)
    batch = copy.copy(batch)
    batch.image = image
    return batch
