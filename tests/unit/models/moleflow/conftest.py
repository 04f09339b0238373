"""Fixtures shared by the model-layer tests: in-memory synthetic product images and the backbone
features of the tiny configuration (EfficientNet-Lite0 at 64 px: an 8 x 8 grid of 152 patch
channels, followed by 320 pooled stride-32 channels for the global score and the router)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from anomalib_moleflow.data.synthetic import PRODUCTS, product_image
from anomalib_moleflow.models.moleflow import MoLEFlowConfig, MoLEFlowModel

ProductImages = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_product_images(style: str, n: int, seed: int = 0, defect: bool = False, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` in ``[0, 1]`` of synthetic product ``style`` and their
    boolean masks ``(n, size, size)`` (all false unless ``defect``)."""
    rng = np.random.default_rng(seed)
    pairs = [product_image(PRODUCTS[style], rng, size, defect=defect) for _ in range(n)]
    images = torch.from_numpy(np.stack([image for image, _ in pairs])).permute(0, 3, 1, 2).float() / 255.0
    masks = torch.from_numpy(np.stack([mask for _, mask in pairs])) > 0
    return images, masks


@pytest.fixture(scope="session")
def product_images() -> ProductImages:
    """:func:`make_product_images` (images of a synthetic product, generated in memory)."""
    return make_product_images


@pytest.fixture(scope="session")
def tiny_extractor_model(tiny_config: MoLEFlowConfig) -> MoLEFlowModel:
    """A tiny model used only for its (pretrained, frozen) backbone: every tiny model computes the
    same features. Read-only: do not add tasks to it."""
    return MoLEFlowModel(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_features(tiny_extractor_model: MoLEFlowModel) -> torch.Tensor:
    """Backbone features ``(4, 8, 8, 472)`` of 4 random 64 px images."""
    generator = torch.Generator().manual_seed(1)
    return tiny_extractor_model.extract_features(torch.rand(4, 3, 64, 64, generator=generator))
