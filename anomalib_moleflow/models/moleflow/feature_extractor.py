"""Patch features: frozen backbone, PatchCore-style local aggregation, 2D position embedding."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_moleflow.backbones import create_feature_extractor, feature_channels

from .config import MoLEFlowConfig


def sinusoidal_position_embedding_2d(height: int, width: int, channels: int) -> torch.Tensor:
    """Fixed 2D sine/cosine embedding ``(H, W, C)``: half the channels encode rows, half columns."""
    quarter = max(1, channels // 4)
    freq = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(10000.0) / quarter))
    ys = torch.arange(height, dtype=torch.float32)[:, None] * freq[None]
    xs = torch.arange(width, dtype=torch.float32)[:, None] * freq[None]
    row = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(height, width, -1)
    col = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(height, width, -1)
    emb = torch.cat([row, col], dim=-1)
    if emb.shape[-1] < channels:
        emb = F.pad(emb, (0, channels - emb.shape[-1]))
    return emb[..., :channels].contiguous()


class PatchFeatureExtractor(nn.Module):
    """Images ``(B, 3, S, S)`` to patch features ``(B, H, W, C + G)`` on the finest chosen stage's grid.

    The first ``out_channels`` (C) channels are the patch features the flow models. When the
    global score reads deeper stages (``config.scoring.global_score_layers``), their globally pooled
    maps follow as ``global_channels`` (G) more channels, the same at every grid position,
    so a cached feature tensor carries everything an image is scored and routed with.
    The backbone is frozen and always stays in eval mode.
    """

    def __init__(self, config: MoLEFlowConfig) -> None:
        super().__init__()
        self.config = config.features
        features = config.features
        scoring = config.scoring
        self.global_layers = tuple(scoring.global_score_layers) if scoring.global_score_weight > 0 else ()
        out_indices = tuple(sorted(set(features.layers) | set(self.global_layers)))
        self.backbone = create_feature_extractor(
            features.backbone,
            out_indices=out_indices,
            pretrained=features.pre_trained,
            img_size=features.image_size,
        )
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.backbone.eval()
        position = {index: n for n, index in enumerate(out_indices)}
        self._patch_maps = [position[i] for i in features.layers]
        self._global_maps = [position[i] for i in self.global_layers]
        all_channels = feature_channels(self.backbone)
        self.layer_channels = [all_channels[n] for n in self._patch_maps]
        self.global_channels = sum(all_channels[n] for n in self._global_maps)
        with torch.no_grad():
            maps = self.backbone(torch.zeros(1, 3, features.image_size, features.image_size))
        self.backbone_grid: tuple[int, int] = tuple(maps[self._patch_maps[0]].shape[-2:])  # type: ignore[assignment]
        step = features.grid_downsample
        if self.backbone_grid[0] < step or self.backbone_grid[1] < step:
            msg = f"MoLEFlowConfig.features.grid_downsample={step} exceeds the backbone grid {self.backbone_grid}"
            raise ValueError(msg)
        self.grid_size: tuple[int, int] = (-(-self.backbone_grid[0] // step), -(-self.backbone_grid[1] // step))
        if features.feature_dim is None:
            self.out_channels = sum(self.layer_channels)
        else:
            self.out_channels = features.feature_dim
        if self.out_channels % 2:
            self.out_channels += 1  # the coupling flow needs an even width: pad one zero channel
        pos = sinusoidal_position_embedding_2d(*self.grid_size, self.out_channels)
        self.register_buffer("position_embedding", pos[None], persistent=False)

    @property
    def total_channels(self) -> int:
        """Channels of the returned tensor: patch channels plus pooled global channels."""
        return self.out_channels + self.global_channels

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        """Keep the frozen backbone in eval mode whatever the parent does."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return ``(B, H, W, C + G)`` features (position embedding added to the C patch channels)."""
        all_maps = self.backbone(images)
        maps = [all_maps[n] for n in self._patch_maps]
        k = self.config.feature_aggregation_kernel
        out = []
        for fmap in maps:
            if k > 1:
                fmap = F.avg_pool2d(fmap, k, stride=1, padding=k // 2, count_include_pad=False)
            if fmap.shape[-2:] != self.backbone_grid:
                fmap = F.interpolate(fmap, size=self.backbone_grid, mode="bilinear", align_corners=False)
            if self.config.grid_downsample > 1:
                fmap = F.avg_pool2d(fmap, self.config.grid_downsample, ceil_mode=True)
            if self.config.feature_dim is not None:
                # PatchCore-style channel pooling to a common width, then layers are averaged.
                b, c, h, w = fmap.shape
                fmap = F.adaptive_avg_pool1d(fmap.permute(0, 2, 3, 1).reshape(-1, 1, c), self.config.feature_dim)
                fmap = fmap.reshape(b, h, w, -1).permute(0, 3, 1, 2)
            out.append(fmap)
        if self.config.feature_dim is None:
            features = torch.cat(out, dim=1)
        else:
            features = torch.stack(out).mean(0)
        features = features.permute(0, 2, 3, 1)
        if features.shape[-1] < self.out_channels:
            features = F.pad(features, (0, self.out_channels - features.shape[-1]))
        if self.config.use_position_embedding:
            features = features + self.position_embedding.to(features.dtype)
        if self._global_maps:
            pooled = torch.cat([all_maps[n].mean(dim=(2, 3)) for n in self._global_maps], dim=1)
            features = torch.cat([features, pooled[:, None, None, :].expand(*features.shape[:3], -1)], dim=-1)
        return features.contiguous()
