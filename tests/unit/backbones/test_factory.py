"""Frozen ``features_only`` extractors, input normalisation and the backbone error messages.

Runs offline; converted weights go to a per-module temp cache, never the user's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import converted_weights

from anomalib_moleflow.backbones import (
    backbone_normalization,
    create_feature_extractor,
    feature_channels,
)

VIT = "vit_small_patch14_dinov2"


def test_lite0_extractor_shapes_and_weights(no_download: None) -> None:
    extractor = create_feature_extractor("tf_efficientnet_lite0", (2, 3))
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    assert feature_channels(extractor) == [40, 112]
    assert extractor.feature_info.reduction() == [8, 16]
    with torch.no_grad():
        feats = extractor(torch.randn(2, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 32, 32), (2, 112, 16, 16)]
    converted = converted_weights("tf_efficientnet_lite0")
    for key, value in extractor.state_dict().items():  # features_only loading is non-strict in timm
        assert torch.equal(value, converted[key]), key


def test_tagged_name_and_untrained_extractor(no_download: None) -> None:
    tagged = create_feature_extractor("tf_efficientnet_lite0.moleflow_offline", (2,))
    plain = create_feature_extractor("tf_efficientnet_lite0", (2,))
    assert all(torch.equal(a, b) for a, b in zip(tagged.state_dict().values(), plain.state_dict().values(), strict=True))
    torch.manual_seed(0)
    random = create_feature_extractor("tf_efficientnet_lite0", (2,), pretrained=False)
    assert not random.training and not any(p.requires_grad for p in random.parameters())
    converted = converted_weights("tf_efficientnet_lite0")
    assert not torch.equal(random.state_dict()["conv_stem.weight"], converted["conv_stem.weight"])


def test_dinov2_at_another_size_resamples_the_position_embedding(no_download: None) -> None:
    """At 126 px (a 9x9 grid) the stored 37x37 position embedding is resampled; features keep 384 channels."""
    extractor = create_feature_extractor(VIT, (11,), img_size=126)
    assert tuple(extractor.model.pos_embed.shape) == (1, 1 + 9 * 9, 384)
    with torch.no_grad():
        feats = extractor(torch.randn(1, 3, 126, 126))
    assert [tuple(f.shape) for f in feats] == [(1, 384, 9, 9)]
    converted = converted_weights(VIT)
    assert torch.equal(extractor.model.blocks[3].attn.qkv.weight, converted["blocks.3.attn.qkv.weight"])


def test_normalization() -> None:
    assert backbone_normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std = backbone_normalization(f"{VIT}.moleflow_offline")
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(RuntimeError, match="no_such_net"):
        backbone_normalization("no_such_net")


def test_vit_img_size_must_fit_patches() -> None:
    with pytest.raises(ValueError, match=rf"'{VIT}'.*multiple of the patch size 14, got 256"):
        create_feature_extractor(VIT, (11,), img_size=256)


def test_empty_out_indices() -> None:
    with pytest.raises(ValueError, match="out_indices"):
        create_feature_extractor("tf_efficientnet_lite0", ())


def test_unknown_backbone_error() -> None:
    with pytest.raises(RuntimeError, match=r"no_such_net.*tf_efficientnet_lite0"):
        create_feature_extractor("no_such_net", (1, 2))


def test_feature_channels_needs_a_timm_extractor() -> None:
    with pytest.raises(TypeError, match="Linear has no timm feature_info"):
        feature_channels(torch.nn.Linear(2, 2))


def _raise_offline(*args: object, **kwargs: object) -> None:
    msg = "no network"
    raise OSError(msg)


def test_download_failure_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A normal timm name whose weights are not cached fails with a clear message when offline."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", _raise_offline)  # noqa: SLF001
    with pytest.raises(RuntimeError, match=r"'resnet18'.*tf_efficientnet_lite0") as info:
        create_feature_extractor("resnet18", (1, 2))
    assert "HF_HUB_OFFLINE" in str(info.value)
