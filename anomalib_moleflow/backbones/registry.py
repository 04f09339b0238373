"""Cache of converted offline weights and their registration in timm's pretrained-cfg registry.

The packaged weights are converted once to a timm-named ``.pth`` in the cache directory
(``$ANOMALIB_MOLEFLOW_CACHE``, else ``$XDG_CACHE_HOME/anomalib_moleflow``, else
``~/.cache/anomalib_moleflow``), written atomically. :func:`register_offline_weights` then
adds a pretrained tag ``<arch>.moleflow_offline`` to timm's registry whose cfg points at that
file (no URL, no hub id), so an unchanged ``timm.create_model(tagged, pretrained=True)`` -
e.g. inside anomalib's ``TimmFeatureExtractor`` - loads it without network access.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch

from anomalib_moleflow.io import atomic_torch_save

from .dinov2_onnx import DINOV2_ONNX_ARCH, convert_dinov2_onnx
from .efficientnet_lite import EFFICIENTNET_LITE_STAGE_DEPTHS, convert_efficientnet_lite

__all__ = [
    "OFFLINE_BACKBONES",
    "OFFLINE_TAG",
    "cache_dir",
    "offline_arch",
    "offline_weights_path",
    "register_offline_weights",
]

OFFLINE_TAG = "moleflow_offline"
# Bump when a converter's output changes, so stale cached files are not reused.
_FORMAT_VERSION = 1

_CONVERTERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    **{name: (lambda n=name: convert_efficientnet_lite(n)) for name in EFFICIENTNET_LITE_STAGE_DEPTHS},
    DINOV2_ONNX_ARCH: convert_dinov2_onnx,
}
OFFLINE_BACKBONES: tuple[str, ...] = (
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "vit_small_patch14_dinov2",
)
assert set(OFFLINE_BACKBONES) == set(_CONVERTERS)  # noqa: S101


def cache_dir() -> Path:
    """Directory for converted weights (not created here)."""
    env = os.environ.get("ANOMALIB_MOLEFLOW_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "anomalib_moleflow"


def offline_arch(name: str) -> str | None:
    """Return the architecture if ``name`` is an offline backbone (untagged or ``.moleflow_offline``)."""
    arch, _, tag = name.partition(".")
    if arch in OFFLINE_BACKBONES and tag in ("", OFFLINE_TAG):
        return arch
    return None


def _require_offline(name: str) -> str:
    arch = offline_arch(name)
    if arch is None:
        msg = f"'{name}' has no packaged offline weights; offline backbones are {OFFLINE_BACKBONES}."
        raise KeyError(msg)
    return arch


def _is_valid(path: Path) -> bool:
    """True if ``path`` holds a loadable state dict (a truncated/corrupt file is reconverted)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # cheap: no full read
    except Exception:  # noqa: BLE001
        return False
    return isinstance(sd, dict) and bool(sd)


def offline_weights_path(name: str) -> Path:
    """Path of the converted timm-named ``.pth`` for ``name``, converting it on first use."""
    arch = _require_offline(name)
    path = cache_dir() / f"{arch}.{OFFLINE_TAG}.v{_FORMAT_VERSION}.pth"
    if not (path.is_file() and _is_valid(path)):
        atomic_torch_save(_CONVERTERS[arch](), path)
    return path


def register_offline_weights(name: str) -> str:
    """Convert/cache the weights of ``name`` and register them in timm as a pretrained tag.

    Returns ``"<arch>.moleflow_offline"``; ``timm.create_model(<that>, pretrained=True, ...)``
    (and so anomalib's ``TimmFeatureExtractor(backbone=<that>, ...)``) then loads the local file.
    Calling it again re-registers (e.g. after the cache directory changed).
    """
    from timm.models import _registry

    arch = _require_offline(name)
    path = offline_weights_path(arch)
    tagged = f"{arch}.{OFFLINE_TAG}"
    base = _registry.get_pretrained_cfg(arch)
    if base is None:  # pragma: no cover - all offline archs have timm cfgs
        msg = f"timm has no pretrained cfg for '{arch}'."
        raise RuntimeError(msg)
    cfg = dataclasses.replace(
        base,
        file=str(path),
        url=None,
        hf_hub_id=None,
        hf_hub_filename=None,
        state_dict=None,
        source=None,
        custom_load=False,
        architecture=arch,
        tag=OFFLINE_TAG,
    )
    _registry._model_pretrained_cfgs[tagged] = cfg  # noqa: SLF001
    _registry._model_has_pretrained.add(tagged)  # noqa: SLF001
    if tagged not in _registry._model_with_tags[arch]:  # noqa: SLF001
        _registry._model_with_tags[arch].append(tagged)  # noqa: SLF001
    default_cfg = _registry._model_default_cfgs.get(arch)  # noqa: SLF001
    if default_cfg is not None:
        default_cfg.cfgs[OFFLINE_TAG] = cfg
        if OFFLINE_TAG not in default_cfg.tags:
            default_cfg.tags.append(OFFLINE_TAG)  # appended: timm's own default tag stays first
    return tagged
