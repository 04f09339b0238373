"""A PatchCore-like nearest-neighbour score on the backbone features MoLE-Flow uses: the ceiling its
quality is measured against.

Features: ``tf_efficientnet_lite0`` stages 2 and 3 (strides 8 and 16) at 256 px, each averaged
over 3x3 neighbourhoods, the stride-16 map upsampled to the stride-8 grid, concatenated (a 32x32
grid of 152 channels). Memory: a random ``bank_ratio`` (25%) of all training patches. A test
patch scores its Euclidean distance to the nearest memory patch; the image score is the largest
patch score, the map the patch scores upsampled (bilinear) to the input and smoothed (sigma 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from anomalib.data import AnomalibDataModule
from torch.nn import functional as F  # noqa: N812

from anomalib_moleflow.backbones import create_feature_extractor
from anomalib_moleflow.continual.evaluation import loader_of_test_split
from anomalib_moleflow.continual.metrics import image_and_pixel_metrics
from anomalib_moleflow.models.moleflow import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator
from anomalib_moleflow.models.moleflow.pre_processing import moleflow_pre_processor, prepare_batch


@dataclass(frozen=True)
class CeilingSettings:
    """How the nearest-neighbour score is built."""

    backbone: str = "tf_efficientnet_lite0"
    layers: tuple[int, ...] = (2, 3)
    image_size: int = 256
    aggregation_kernel: int = 3
    bank_ratio: float = 0.25
    seed: int = 0
    chunk: int = 4096


class NearestNeighbourCeiling:
    """Fit a patch memory on a datamodule's training images, score its test images."""

    def __init__(self, settings: CeilingSettings | None = None) -> None:
        self.settings = settings or CeilingSettings()
        s = self.settings
        self.backbone = create_feature_extractor(s.backbone, out_indices=s.layers, img_size=s.image_size)
        self.pre_processor = moleflow_pre_processor(
            MoLEFlowConfig.from_dict({"features": {"backbone": s.backbone, "image_size": s.image_size}})
        )
        self.maps = AnomalyMapGenerator((s.image_size, s.image_size), sigma=4.0)
        self.bank: torch.Tensor | None = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, H, W, C)`` of pre-processed images."""
        k = self.settings.aggregation_kernel
        maps = [F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False) for m in self.backbone(images)]
        grid = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(maps, dim=1).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def fit(self, datamodule: AnomalibDataModule) -> int:
        """Build the memory from the training images; returns its size."""
        datamodule.setup("fit")
        patches = []
        for batch in datamodule.train_dataloader():
            images, _ = prepare_batch(self.pre_processor, batch.image, None, self.maps.input_size)
            patches.append(self.features(images).flatten(0, 2))
        patches_t = torch.cat(patches)
        generator = torch.Generator().manual_seed(self.settings.seed)
        keep = torch.randperm(len(patches_t), generator=generator)[: max(1, int(self.settings.bank_ratio * len(patches_t)))]
        self.bank = patches_t[keep]
        return len(self.bank)

    @torch.no_grad()
    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Distance ``(B, H, W)`` of every patch to its nearest memory patch."""
        if self.bank is None:
            msg = "fit the ceiling before scoring"
            raise RuntimeError(msg)
        flat = features.flatten(0, 2)
        bank_sq = (self.bank**2).sum(1)
        best = torch.empty(len(flat))
        for start in range(0, len(flat), self.settings.chunk):
            x = flat[start : start + self.settings.chunk]
            d2 = (x**2).sum(1, keepdim=True) - 2 * x @ self.bank.T + bank_sq
            best[start : start + len(x)] = d2.min(dim=1).values.clamp_min(0).sqrt()
        return best.view(features.shape[:3])

    @torch.no_grad()
    def evaluate(self, datamodule: AnomalibDataModule) -> dict[str, float]:
        """Image AUROC (and pixel AUROC / AP where masks exist) on the test split."""
        scores, maps, labels, masks = [], [], [], []
        for batch in loader_of_test_split(datamodule):
            images, mask = prepare_batch(self.pre_processor, batch.image, batch.gt_mask, self.maps.input_size)
            patch = self.patch_scores(self.features(images))
            scores.append(patch.flatten(1).max(dim=1).values)
            maps.append(self.maps(patch)[:, 0])
            labels.append(batch.gt_label.long())
            if mask is not None:
                masks.append(mask)
        mask_t = torch.cat(masks) if masks else None
        return image_and_pixel_metrics(torch.cat(scores), torch.cat(maps), torch.cat(labels), mask_t)
