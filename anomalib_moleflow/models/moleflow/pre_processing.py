"""Pre-processing of MoLE-Flow's inputs: the anomalib pre-processor it is built with, and raw
batches turned into model inputs and masks the way training and evaluation see them."""

from __future__ import annotations

import copy
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import convert_center_crop_transform
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import Compose, Normalize, Resize, Transform

from anomalib_moleflow.backbones import backbone_normalization

from .config import MoLEFlowConfig

__all__ = ["AntialiasedPreProcessor", "moleflow_pre_processor", "prepare_batch"]


def _exportable(transform: Transform | None) -> Transform | None:
    """anomalib's exportable form of ``transform`` with its antialiasing kept."""
    return convert_center_crop_transform(copy.deepcopy(transform)) if transform is not None else None


class AntialiasedPreProcessor(PreProcessor):
    """anomalib's pre-processor whose inference transform (``forward``, used by ``MoLEFlow.forward``
    and anomalib's inferencers) keeps the antialiased resize of training: anomalib turns the
    antialiasing off there for export, which moved scores away from the thresholds fitted in
    training. MoLE-Flow's own export resizes with antialiasing in the graph (:mod:`.export`)."""

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        self.export_transform = _exportable(self.transform)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the saved transform as anomalib does, keeping its antialiasing for inference."""
        super().load_checkpoint_config(config)
        self.export_transform = _exportable(self.transform)


def moleflow_pre_processor(config: MoLEFlowConfig) -> PreProcessor:
    """Resize (antialiased) to the configured image size and normalise with the backbone's statistics."""
    mean, std = backbone_normalization(config.features.backbone)
    size = (config.features.image_size, config.features.image_size)
    return AntialiasedPreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=list(mean), std=list(std))]))


def prepare_batch(
    pre_processor: nn.Module | None, images: torch.Tensor, gt_mask: torch.Tensor | None, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``pre_processor``'s transform to raw images ``(B, 3, H, W)`` (and their masks, jointly),
    and return the images with boolean ``(B, H, W)`` masks resized (nearest) to ``size``, on the CPU.

    Any anomalib model's pre-processor works, so baselines can be evaluated the same way.
    """
    transform = getattr(pre_processor, "transform", None)
    if transform is not None:
        images, gt_mask = transform(images, gt_mask) if gt_mask is not None else (transform(images), None)
    if gt_mask is None:
        return images, None
    mask = gt_mask.float()
    mask = mask[:, 0] if mask.ndim == 4 else mask
    if mask.shape[-2:] != tuple(size):
        mask = F.interpolate(mask[:, None], size=size, mode="nearest")[:, 0]
    return images, mask.cpu() > 0.5
