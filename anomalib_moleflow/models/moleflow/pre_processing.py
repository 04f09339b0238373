"""Pre-processing of MoLE-Flow's inputs: the anomalib pre-processor it is built with, and raw
batches turned into model inputs and masks the way training and evaluation see them."""

from __future__ import annotations

import torch
from anomalib.pre_processing import PreProcessor
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_moleflow.backbones import backbone_normalization

from .config import MoLEFlowConfig

__all__ = ["moleflow_pre_processor", "prepare_batch"]


def moleflow_pre_processor(config: MoLEFlowConfig) -> PreProcessor:
    """Resize (antialiased) to the configured image size and normalise with the backbone's statistics."""
    mean, std = backbone_normalization(config.features.backbone)
    size = (config.features.image_size, config.features.image_size)
    return PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=list(mean), std=list(std))]))


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
