"""Patch features: grid and width, frozen backbone, position embedding, pooled width option.

EfficientNet-Lite0 stages 2 and 3 have 40 and 112 channels at strides 8 and 16; the
features live on the stride-8 grid.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import tiny_config
from torch.nn import functional as F  # noqa: N812

from anomalib_moleflow.models.moleflow.feature_extractor import (
    PatchFeatureExtractor,
    sinusoidal_position_embedding_2d,
)

LITE0_CHANNELS = (40, 112)


def _extractor(**overrides: Any) -> PatchFeatureExtractor:  # noqa: ANN401
    """Extractor of the tiny configuration (64 px, 8 x 8 grid) without the global channels,
    with ``overrides`` (plain field names)."""
    return PatchFeatureExtractor(tiny_config(**{"global_score_weight": 0.0, **overrides}))


@pytest.fixture(scope="module")
def lite0_64() -> PatchFeatureExtractor:
    """The tiny extractor, shared by the tests of this module."""
    return _extractor()


@pytest.mark.parametrize(("image_size", "downsample", "grid"), [(64, 1, 8), (256, 1, 32), (256, 2, 16), (72, 2, 5)])
def test_grid_and_channels(image_size: int, downsample: int, grid: int) -> None:
    extractor = _extractor(image_size=image_size, grid_downsample=downsample)
    assert extractor.layer_channels == list(LITE0_CHANNELS)
    assert extractor.out_channels == sum(LITE0_CHANNELS) == 152
    assert extractor.backbone_grid == (-(-image_size // 8),) * 2
    assert extractor.grid_size == (grid, grid)
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, image_size, image_size))
    assert features.shape == (2, grid, grid, 152)
    assert torch.isfinite(features).all()


def test_backbone_is_frozen_and_stays_in_eval_mode(lite0_64: PatchFeatureExtractor) -> None:
    assert all(not p.requires_grad for p in lite0_64.backbone.parameters())
    buffers_before = {k: v.clone() for k, v in lite0_64.backbone.state_dict().items()}
    lite0_64.train()
    assert lite0_64.training
    assert not lite0_64.backbone.training
    assert not any(m.training for m in lite0_64.backbone.modules())
    # the parent switching to train mode must not switch the backbone either
    parent = torch.nn.Sequential(lite0_64)
    parent.train()
    assert not any(m.training for m in lite0_64.backbone.modules())
    # a forward pass in "train" mode leaves the BatchNorm statistics alone and builds no graph
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    features = lite0_64(images)
    assert not features.requires_grad
    for key, value in lite0_64.backbone.state_dict().items():
        assert torch.equal(value, buffers_before[key]), key
    lite0_64.eval()


def test_features_are_deterministic_and_batch_independent(lite0_64: PatchFeatureExtractor) -> None:
    images = torch.rand(3, 3, 64, 64)
    together = lite0_64(images)
    alone = lite0_64(images[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    assert torch.equal(lite0_64(images), together)


def test_position_embedding_buffer(lite0_64: PatchFeatureExtractor) -> None:
    emb = lite0_64.position_embedding
    assert emb.shape == (1, 8, 8, 152)
    # fixed, not learned, and not saved in checkpoints (recomputed from the config)
    assert "position_embedding" not in dict(lite0_64.named_parameters())
    assert "position_embedding" not in lite0_64.state_dict()
    assert torch.equal(emb[0], sinusoidal_position_embedding_2d(8, 8, 152))


def test_position_embedding_rows_and_columns() -> None:
    height, width, channels = 6, 5, 16
    emb = sinusoidal_position_embedding_2d(height, width, channels)
    assert emb.shape == (height, width, channels)
    half = channels // 2
    rows, cols = emb[..., :half], emb[..., half:]
    # the first half encodes the row only, the second half the column only
    assert torch.equal(rows, rows[:, :1].expand_as(rows))
    assert torch.equal(cols, cols[:1].expand_as(cols))
    assert not torch.equal(rows[0, 0], rows[1, 0])
    assert not torch.equal(cols[0, 0], cols[0, 1])
    # so a patch and its transpose get different codes (rows and columns are told apart)
    square = sinusoidal_position_embedding_2d(4, 4, channels)
    assert not torch.equal(square[1, 2], square[2, 1])
    assert torch.equal(square[1, 2, :half], square[2, 1, half:])  # same code, other half
    # sin/cos pairs: frequency 1 at channel 0 (sin) and channel quarter (cos)
    quarter = channels // 4
    ys = torch.arange(height, dtype=torch.float32)
    assert torch.allclose(emb[:, 0, 0], ys.sin())
    assert torch.allclose(emb[:, 0, quarter], ys.cos())
    xs = torch.arange(width, dtype=torch.float32)
    assert torch.allclose(emb[0, :, half], xs.sin())
    assert torch.allclose(emb[0, :, half + quarter], xs.cos())
    assert emb.abs().max() <= 1.0
    # every channel pair (sin^2 + cos^2) has unit norm
    assert torch.allclose(emb[..., :quarter] ** 2 + emb[..., quarter:half] ** 2, torch.ones(height, width, quarter))


def test_position_embedding_odd_widths() -> None:
    for channels in (1, 2, 3, 6, 7, 153):
        emb = sinusoidal_position_embedding_2d(3, 4, channels)
        assert emb.shape == (3, 4, channels)
        assert torch.isfinite(emb).all()


def test_position_embedding_is_added(lite0_64: PatchFeatureExtractor) -> None:
    plain = _extractor(use_position_embedding=False)
    plain.backbone.load_state_dict(lite0_64.backbone.state_dict())
    images = torch.rand(2, 3, 64, 64)
    difference = lite0_64(images) - plain(images)
    assert torch.allclose(difference, lite0_64.position_embedding.expand_as(difference), atol=1e-5)


def _reference_pooled_features(extractor: PatchFeatureExtractor, images: torch.Tensor, dim: int) -> torch.Tensor:
    """Each layer: k x k average, resize to the stride-8 grid, pool channels to ``dim``; then average."""
    maps = extractor.backbone(images)
    pooled = []
    for fmap in maps:
        fmap = F.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=False)
        fmap = F.interpolate(fmap, size=extractor.grid_size, mode="bilinear", align_corners=False)
        b, c, h, w = fmap.shape
        flat = fmap.permute(0, 2, 3, 1).reshape(-1, 1, c)
        pooled.append(F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim))
    return torch.stack(pooled).mean(0)


@pytest.mark.parametrize("feature_dim", [64, 40])
def test_feature_dim_pools_and_averages_layers(feature_dim: int) -> None:
    extractor = _extractor(feature_dim=feature_dim, use_position_embedding=False)
    assert extractor.out_channels == feature_dim
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(images)
        expected = _reference_pooled_features(extractor, images, feature_dim)
    assert features.shape == (2, 8, 8, feature_dim)
    assert torch.allclose(features, expected, atol=1e-5)


def test_odd_feature_dim_is_padded_to_even() -> None:
    extractor = _extractor(feature_dim=63, use_position_embedding=False)
    assert extractor.out_channels == 64
    with torch.no_grad():
        features = extractor(torch.rand(1, 3, 64, 64))
    assert features.shape[-1] == 64
    assert torch.equal(features[..., 63], torch.zeros_like(features[..., 63]))  # the pad channel
    assert features[..., :63].abs().sum() > 0
    # with the embedding the pad channel carries only the embedding
    with_pos = _extractor(feature_dim=63)
    assert with_pos.position_embedding.shape == (1, 8, 8, 64)


def test_aggregation_kernel_one_disables_smoothing(lite0_64: PatchFeatureExtractor) -> None:
    raw = _extractor(feature_aggregation_kernel=1, use_position_embedding=False)
    raw.backbone.load_state_dict(lite0_64.backbone.state_dict())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = raw(images)
        maps = raw.backbone(images)
    assert torch.allclose(features[..., :40], maps[0].permute(0, 2, 3, 1), atol=1e-6)
    upsampled = F.interpolate(maps[1], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(features[..., 40:], upsampled.permute(0, 2, 3, 1), atol=1e-6)
    assert math.prod(features.shape) == 8 * 8 * 152


def test_grid_downsample_averages_the_backbone_grid() -> None:
    fine = _extractor(image_size=64, grid_downsample=1, use_position_embedding=False)
    coarse = _extractor(image_size=64, grid_downsample=2, use_position_embedding=False)
    coarse.backbone = fine.backbone  # same weights
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.avg_pool2d(fine(images).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        assert torch.allclose(coarse(images), expected, atol=1e-6)


def test_grid_downsample_larger_than_the_grid_is_named() -> None:
    with pytest.raises(ValueError, match="grid_downsample"):
        _extractor(image_size=64, grid_downsample=16)


def test_global_layers_append_pooled_deep_features() -> None:
    plain = _extractor(image_size=64)
    extractor = _extractor(image_size=64, global_score_weight=0.5, global_score_layers=(4,))
    extractor.backbone.load_state_dict(plain.backbone.state_dict(), strict=False)
    assert extractor.out_channels == 152 and extractor.global_channels == 320
    assert extractor.total_channels == 472
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(images)
        deep = extractor.backbone(images)[-1].mean(dim=(2, 3))
        patch = plain(images)
    assert features.shape == (2, 8, 8, 472)
    assert torch.allclose(features[..., :152], patch, atol=1e-6)  # patch part unchanged
    assert torch.equal(features[:, 3, 5, 152:], deep)  # the same pooled vector at every position
    assert torch.equal(features[:, 0, 0, 152:], features[:, 7, 7, 152:])


def test_global_channels_need_a_positive_global_score_weight() -> None:
    """The pooled deep stages are only computed when the global score uses them."""
    off = _extractor(global_score_weight=0.0, global_score_layers=(4,))
    assert off.global_layers == () and off.global_channels == 0 and off.total_channels == 152
    patch_pooled = _extractor(global_score_weight=0.5, global_score_layers=())
    assert patch_pooled.global_channels == 0 and patch_pooled.total_channels == 152
    with torch.no_grad():
        assert patch_pooled(torch.rand(1, 3, 64, 64)).shape == (1, 8, 8, 152)


def test_global_layer_shared_with_a_patch_layer_is_computed_once() -> None:
    extractor = _extractor(global_score_weight=0.5, global_score_layers=(3,))
    assert extractor.global_channels == 112 and extractor.total_channels == 264
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(images)
        stage3 = extractor.backbone(images)[1].mean(dim=(2, 3))
    assert torch.equal(features[:, 4, 2, 152:], stage3)
