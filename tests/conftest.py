"""Shared fixtures: a tiny, fast MoLE-Flow configuration and a tiny MVTec-layout dataset.

The tiny model (EfficientNet-Lite0 at 64 px, 2 coupling blocks, rank-2 LoRA) builds in
about two seconds and runs a 64 px image in milliseconds on a CPU; its backbone weights
come from an installed package, so nothing is downloaded (run with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One intra-op thread unless the caller chose otherwise (OMP_NUM_THREADS). The models here are
# tiny, and on a small machine shared with other jobs torch's spinning worker threads made
# the Engine-based tests 10-40x slower (e.g. 38 s instead of 3 s for a two-task fit) on
# 2 busy cores. Set before any test runs; inherited by the CLI subprocesses via the env.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

#: Fields of a tiny, fast :class:`MoLEFlowConfig` (plain data, so it also works as ``--model.config``).
TINY_CONFIG: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "image_size": 64,
    "n_coupling_blocks": 2,
    "lora_rank": 2,
    "subnet_hidden_ratio": 0.5,
    "dia_hidden_ratio": 0.25,
    "grid_downsample": 1,  # keep the 8x8 grid of a 64 px image (the default 2 would leave 4x4)
}

WIDGET_SIZE = 64
WIDGET_CATEGORY = "widget"


def _widget_image(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 64x64 RGB stripe texture with a little noise; ``defect`` paints a dark blob.

    Returns the image (H, W, 3 uint8) and its binary mask (H, W uint8 in {0, 255}).
    """
    size = WIDGET_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.25 * np.sin(2 * np.pi * (xx + yy) / 8.0 + phase)
    base = np.stack([stripes * 200 + 30, stripes * 160 + 50, stripes * 120 + 60], axis=-1)
    base += rng.normal(0, 4, size=base.shape)
    mask = np.zeros((size, size), dtype=np.uint8)
    if defect:
        cy, cx = rng.integers(16, size - 16, size=2)
        radius = int(rng.integers(6, 10))
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        base[blob] = np.array([20.0, 200.0, 20.0]) + rng.normal(0, 4, size=(int(blob.sum()), 3))
        mask[blob] = 255
    return np.clip(base, 0, 255).astype(np.uint8), mask


def make_widget_dataset(root: Path, category: str = WIDGET_CATEGORY, n_train: int = 12, n_test: int = 4) -> Path:
    """Write a tiny MVTec AD tree ``root/category/{train/good,test/{good,defect},ground_truth/defect}``."""
    rng = np.random.default_rng(0)
    cat = root / category
    folders = {
        "train": cat / "train" / "good",
        "test_good": cat / "test" / "good",
        "test_defect": cat / "test" / "defect",
        "masks": cat / "ground_truth" / "defect",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        image, _ = _widget_image(rng, defect=False)
        Image.fromarray(image).save(folders["train"] / f"{i:03d}.png")
    for i in range(n_test):
        image, _ = _widget_image(rng, defect=False)
        Image.fromarray(image).save(folders["test_good"] / f"{i:03d}.png")
        image, mask = _widget_image(rng, defect=True)
        Image.fromarray(image).save(folders["test_defect"] / f"{i:03d}.png")
        Image.fromarray(mask, mode="L").save(folders["masks"] / f"{i:03d}_mask.png")
    return cat


@pytest.fixture(scope="session")
def tiny_config() -> Mapping[str, Any]:
    """Read-only :data:`TINY_CONFIG`; extend it with ``{**tiny_config, "field": value}``."""
    return MappingProxyType(TINY_CONFIG)


@pytest.fixture(scope="session")
def widget_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder holding the tiny MVTec-layout category ``widget`` (read it, don't write it)."""
    root = tmp_path_factory.mktemp("widget_mvtec")
    make_widget_dataset(root)
    return root
