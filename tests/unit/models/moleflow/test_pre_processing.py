"""MoLE-Flow's pre-processor and the preparation of raw batches."""

from __future__ import annotations

import pytest
import torch
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_moleflow.models.moleflow import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.pre_processing import (
    moleflow_pre_processor,
    prepare_batch,
)


def test_pre_processor_resizes_with_antialiasing_and_normalises_for_the_backbone() -> None:
    lite = moleflow_pre_processor(MoLEFlowConfig.from_dict({"features": {"image_size": 96}}))
    resize, normalize = lite.transform.transforms
    assert isinstance(resize, Resize) and tuple(resize.size) == (96, 96) and resize.antialias is True
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.5, 0.5, 0.5]
    vit = moleflow_pre_processor(MoLEFlowConfig.from_dict({"features": {"backbone": "vit_small_patch14_dinov2"}}))
    assert list(vit.transform.transforms[1].mean) == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)


def test_images_and_masks_are_transformed_together_and_masks_resized() -> None:
    pre = PreProcessor(transform=Compose([Resize((32, 32), antialias=True), Normalize([0.5] * 3, [0.5] * 3)]))
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64)
    masks[0, :32, :32] = 1.0
    out, mask = prepare_batch(pre, images, masks, (16, 16))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, pre.transform(images))
    assert mask.dtype == torch.bool and mask.shape == (2, 16, 16)
    assert mask[0, :8, :8].all() and not mask[0, 8:, 8:].any() and not mask[1].any()


def test_without_masks_or_pre_processor() -> None:
    images = torch.rand(1, 3, 8, 8)
    out, mask = prepare_batch(None, images, None, (8, 8))
    assert out is images and mask is None
    out, mask = prepare_batch(None, images, torch.ones(1, 1, 8, 8), (8, 8))  # (B, 1, H, W) masks too
    assert mask.shape == (1, 8, 8) and mask.all()
