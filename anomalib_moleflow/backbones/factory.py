"""Frozen timm ``features_only`` extractors, offline for :data:`OFFLINE_BACKBONES`."""

from __future__ import annotations

import os

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag

from .dinov2_onnx import DINOV2_ONNX_ARCH
from .registry import (
    OFFLINE_BACKBONES,
    offline_arch,
    offline_weights_path,
    register_offline_weights,
)

__all__ = ["backbone_normalization", "create_feature_extractor", "feature_channels"]

_DINOV2_PATCH = 14
_DINOV2_GRID = 37  # 518 px / 14: grid of the stored position embedding


ALLOW_DOWNLOAD_ENV = "ANOMALIB_MOLEFLOW_ALLOW_DOWNLOAD"
"""Set to 1 to let a backbone without packaged weights download them (timm / Hugging Face hub)."""


def _suggestion() -> str:
    return f"Use one of the offline backbones instead: {', '.join(OFFLINE_BACKBONES)}."


def _download_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in {"1", "true", "yes"} and os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).strip().lower() not in {"1", "true", "yes"}


def _build(name: str, pretrained: bool, kwargs: dict[str, object], out_indices: tuple[int, ...]) -> torch.nn.Module:
    """``timm.create_model`` with an out-of-range stage reported by name (the architecture's)."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except IndexError as exc:
        n_stages = len(timm.create_model(split_model_name_tag(name)[0], pretrained=False, features_only=True).feature_info)
        msg = (
            f"backbone '{split_model_name_tag(name)[0]}' has feature stages 0..{n_stages - 1}, but stages "
            f"{list(out_indices)} were asked for "
            "(features.layers / scoring.global_score_layers)"
        )
        raise ValueError(msg) from exc


def _is_vit(arch: str) -> bool:
    return model_entrypoint(arch).__module__.endswith(".vision_transformer")


def _dinov2_state_dict(img_size: int) -> dict[str, torch.Tensor]:
    """Cached DINOv2 weights with the position embedding resized to ``img_size``.

    Bicubic without antialiasing, as Hugging Face ``Dinov2Model`` (and so the source ONNX
    graph's ``Resize``) interpolates it.
    """
    sd = torch.load(offline_weights_path(DINOV2_ONNX_ARCH), map_location="cpu", weights_only=True)
    grid = img_size // _DINOV2_PATCH
    sd["pos_embed"] = resample_abs_pos_embed(
        sd["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1, interpolation="bicubic", antialias=False,
    )
    return sd


def create_feature_extractor(
    name: str,
    out_indices: tuple[int, ...],
    pretrained: bool = True,
    img_size: int | None = None,
) -> torch.nn.Module:
    """Build a frozen timm ``features_only`` model: ``forward(x) -> list[(B, C, H, W)]``.

    Offline names (:data:`OFFLINE_BACKBONES`, optionally tagged ``.moleflow_offline``) load the
    packaged weights; any other timm name goes through timm as usual (hub download). A failed
    download (no network, ``HF_HUB_OFFLINE=1``) or an unknown name raises ``RuntimeError``
    naming the backbone and suggesting an offline one.

    ``out_indices`` are timm feature indices (stages for CNNs - ``(2, 3)`` gives strides 8 and
    16 for ``tf_efficientnet_liteN`` - and block indices for ViTs). ``img_size`` only applies to
    fixed-input-size models (ViTs), which are also built with ``dynamic_img_size=True`` so
    other input sizes still work (position embedding resampled at run time); for the DINOv2
    backbone it must be a multiple of 14, and so must the input height/width.
    """
    if not out_indices:
        msg = "out_indices must not be empty."
        raise ValueError(msg)
    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        msg = f"Unknown backbone '{name}': timm has no model '{arch}'. {_suggestion()}"
        raise RuntimeError(msg)
    kwargs: dict[str, object] = {"features_only": True, "out_indices": tuple(out_indices)}
    if _is_vit(arch):
        kwargs["dynamic_img_size"] = True
    arch_cfg = get_pretrained_cfg(arch)
    if img_size is not None and arch_cfg is not None and arch_cfg.fixed_input_size:
        kwargs["img_size"] = img_size

    offline = offline_arch(name)
    if offline == DINOV2_ONNX_ARCH and img_size is not None and img_size % _DINOV2_PATCH:
        msg = f"'{name}': img_size must be a multiple of the patch size {_DINOV2_PATCH}, got {img_size}."
        raise ValueError(msg)
    if offline is not None and pretrained:
        overlay = None
        if offline == DINOV2_ONNX_ARCH and img_size is not None and img_size // _DINOV2_PATCH != _DINOV2_GRID:
            overlay = {"state_dict": _dinov2_state_dict(img_size)}
        model = _build(register_offline_weights(offline), True, {**kwargs, "pretrained_cfg_overlay": overlay}, out_indices)
    elif offline is not None or not pretrained:
        model = _build(offline or name, False, kwargs, out_indices)
    else:
        if not _download_allowed():
            msg = (
                f"backbone '{name}' has no packaged weights, and downloading them is off: set {ALLOW_DOWNLOAD_ENV}=1 "
                f"(and leave HF_HUB_OFFLINE unset) to let timm download them. {_suggestion()}"
            )
            raise RuntimeError(msg)
        try:
            model = _build(name, pretrained, kwargs, out_indices)
        except ValueError:
            raise
        except Exception as exc:
            msg = (
                f"Could not create backbone '{name}' (pretrained={pretrained}): {type(exc).__name__}: {exc}. "
                f"Pretrained weights for '{name}' are downloaded by timm, which fails without network access "
                f"or with HF_HUB_OFFLINE=1. {_suggestion()}"
            )
            raise RuntimeError(msg) from exc
    model.eval()
    model.requires_grad_(False)
    return model


def backbone_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` of the input normalization from timm's pretrained cfg for ``name``.

    ``tf_efficientnet_liteN``: 0.5 / 0.5; DINOv2: ImageNet mean / std.
    """
    arch = offline_arch(name) or name
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError as exc:  # invalid tag for a known architecture
        msg = f"No pretrained cfg for backbone '{name}': {exc}"
        raise RuntimeError(msg) from exc
    if cfg is None:
        msg = f"Unknown backbone '{name}': timm has no pretrained cfg for it. {_suggestion()}"
        raise RuntimeError(msg)
    mean = tuple(float(v) for v in cfg.mean)
    std = tuple(float(v) for v in cfg.std)
    return mean, std  # type: ignore[return-value]


def feature_channels(extractor: torch.nn.Module) -> list[int]:
    """Channels of each feature map returned by a timm ``features_only`` extractor."""
    info = getattr(extractor, "feature_info", None)
    if info is None or not hasattr(info, "channels"):
        msg = f"{type(extractor).__name__} has no timm feature_info; build it with create_feature_extractor."
        raise TypeError(msg)
    return list(info.channels())
