"""Cache of converted offline weights and their registration as a timm pretrained tag.

Runs offline; converted weights go to a per-module temp cache, never the user's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from helpers import converted_weights

from anomalib_moleflow.backbones import (
    OFFLINE_BACKBONES,
    OFFLINE_TAG,
    offline_weights_path,
    register_offline_weights,
)
from anomalib_moleflow.backbones.registry import cache_dir, offline_arch

LITES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
VIT = "vit_small_patch14_dinov2"


def test_offline_names() -> None:
    assert set(OFFLINE_BACKBONES) == {*LITES, VIT}
    assert OFFLINE_TAG == "moleflow_offline"
    assert offline_arch("tf_efficientnet_lite1") == "tf_efficientnet_lite1"
    assert offline_arch(f"{VIT}.moleflow_offline") == VIT
    assert offline_arch(f"{VIT}.lvd142m") is None  # timm's own tag: downloaded as usual
    assert offline_arch("resnet18") is None


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANOMALIB_MOLEFLOW_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ANOMALIB_MOLEFLOW_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "anomalib_moleflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "anomalib_moleflow"
    assert not (tmp_path / "home").exists()  # not created by asking


def test_cache_is_reused_and_repaired(_weights_cache: Path) -> None:
    path = offline_weights_path("tf_efficientnet_lite0")
    assert path.parent == _weights_cache and path.name == "tf_efficientnet_lite0.moleflow_offline.v1.pth"
    mtime = path.stat().st_mtime_ns
    assert offline_weights_path("tf_efficientnet_lite0.moleflow_offline") == path
    assert path.stat().st_mtime_ns == mtime  # not reconverted
    path.write_bytes(b"truncated")
    assert offline_weights_path("tf_efficientnet_lite0").stat().st_size > 1_000_000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_bytes(b"")
    repaired = converted_weights("tf_efficientnet_lite0")
    assert "conv_stem.weight" in repaired


def test_names_without_offline_weights_are_refused() -> None:
    with pytest.raises(KeyError, match=r"'resnet18' has no packaged offline weights"):
        offline_weights_path("resnet18")
    with pytest.raises(KeyError, match=r"'tf_efficientnet_lite0\.other_tag'"):
        register_offline_weights("tf_efficientnet_lite0.other_tag")


def test_register_offline_weights_with_anomalib_extractor(no_download: None) -> None:
    tagged = register_offline_weights("tf_efficientnet_lite0")
    assert tagged == "tf_efficientnet_lite0.moleflow_offline"
    assert register_offline_weights(tagged) == tagged  # idempotent
    assert timm.models.get_pretrained_cfg(tagged).file == str(offline_weights_path("tf_efficientnet_lite0"))
    assert timm.list_pretrained("tf_efficientnet_lite0*").count(tagged) == 1
    extractor = TimmFeatureExtractor(backbone=tagged, layers=["blocks.2", "blocks.4"]).eval()
    with torch.no_grad():
        feats = extractor(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in feats.values()] == [(1, 40, 32, 32), (1, 112, 16, 16)]
    converted = converted_weights("tf_efficientnet_lite0")
    for key, value in extractor.feature_extractor.state_dict().items():
        assert torch.equal(value, converted[key]), key

    vit = TimmFeatureExtractor(backbone=register_offline_weights(VIT), layers=["blocks.8"]).eval()
    assert torch.equal(vit.feature_extractor.blocks[8].attn.qkv.weight, converted_weights(VIT)["blocks.8.attn.qkv.weight"])
