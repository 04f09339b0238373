"""Offline backbones: weight conversion, timm registration, extractors, errors.

Runs without network (``HF_HUB_OFFLINE=1``); converted weights go to a per-session temp cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_moleflow.backbones import (
    OFFLINE_BACKBONES,
    backbone_normalization,
    create_feature_extractor,
    feature_channels,
    offline_weights_path,
    register_offline_weights,
)
from anomalib_moleflow.backbones.dinov2_onnx import load_onnx
from anomalib_moleflow.backbones.efficientnet_lite import efficientnet_lite_key_map, load_efficientnet_lite_source

LITES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
VIT = "vit_small_patch14_dinov2"


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Convert into a fresh temp cache, never the user's."""
    path = tmp_path_factory.mktemp("moleflow_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALIB_MOLEFLOW_CACHE", str(path))
        yield path


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any timm hub / URL weight download fail loudly."""

    def _fail(*args: object, **kwargs: object) -> None:
        msg = f"unexpected download: {args}"
        raise AssertionError(msg)

    import timm.models._builder as builder

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(builder, fn, _fail)


def _converted(name: str) -> dict[str, torch.Tensor]:
    return torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- EfficientNet-Lite


@pytest.mark.parametrize("name", LITES)
def test_efficientnet_lite_strict_load_and_tensor_equality(name: str) -> None:
    source = load_efficientnet_lite_source(name)
    converted = _converted(name)
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(converted, strict=True)  # every key present, none extra, shapes match
    assert len(source) == len(converted) == len(model.state_dict())
    mapping = efficientnet_lite_key_map(name, list(source))
    loaded = model.state_dict()
    for src_key, timm_key in mapping.items():
        assert torch.equal(loaded[timm_key], source[src_key]), (src_key, timm_key)


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _reference_lite_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Independent functional EfficientNet-Lite forward on the *source* (lukemelas-named) weights.

    Lite rules: ReLU6, no squeeze-excite, BN eps 1e-3, TF 'SAME' padding. A new stage starts where
    the output width changes; stage strides (1, 2, 2, 2, 1, 2, 1) from the EfficientNet paper.
    """

    def conv(t: torch.Tensor, w: torch.Tensor, s: int = 1, groups: int = 1) -> torch.Tensor:
        return F.conv2d(_same_pad(t, w.shape[-1], s), w, stride=s, groups=groups)

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-3)

    act = F.relu6
    x = act(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    stage_strides, stage, prev_out = (1, 2, 2, 2, 1, 2, 1), -1, None
    for i in range(n_blocks):
        p = f"_blocks.{i}"
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        stride = 1
        if out_ch != prev_out:
            stage += 1
            stride = stage_strides[stage]
        prev_out, inp = out_ch, x
        if f"{p}._expand_conv.weight" in sd:
            x = act(bn(conv(x, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        x = act(bn(conv(x, sd[f"{p}._depthwise_conv.weight"], stride, groups=x.shape[1]), f"{p}._bn1"))
        x = bn(conv(x, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        if stride == 1 and inp.shape == x.shape:
            x = x + inp
    x = act(bn(conv(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _smooth_image(size: int) -> torch.Tensor:
    """Deterministic smooth colour image in [-1, 1] (the lite models' 0.5/0.5 normalization)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([torch.sin(6 * xx + 2 * yy), torch.cos(5 * yy - xx), (xx * yy * 4 - 1).clamp(-1, 1)])
    return img.unsqueeze(0)


@pytest.mark.parametrize("size", [224, 256])
def test_lite0_logits_match_independent_implementation(size: int, no_download: None) -> None:
    name = register_offline_weights("tf_efficientnet_lite0")
    model = timm.create_model(name, pretrained=True).eval()
    x = _smooth_image(size)
    with torch.no_grad():
        logits = model(x)
        reference = _reference_lite_logits(load_efficientnet_lite_source("tf_efficientnet_lite0"), x)
    assert logits.shape == (1, 1000)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", LITES)
def test_lite_imagenet_prediction_on_sample_photo(name: str, no_download: None) -> None:
    """The weights are ImageNet-trained: matplotlib's Grace Hopper photo is a 'military uniform'.

    (ImageNet class 652 is in the top 5 for all three variants, with timm's own eval transform.)
    """
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    try:
        image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    except (OSError, ValueError):
        pytest.skip("matplotlib sample data not installed")
    model = timm.create_model(register_offline_weights(name), pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        top5 = model(transform(image).unsqueeze(0)).topk(5).indices[0].tolist()
    assert 652 in top5, top5


def test_lite0_extractor_shapes_and_weights(no_download: None) -> None:
    extractor = create_feature_extractor("tf_efficientnet_lite0", (2, 3))
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    assert feature_channels(extractor) == [40, 112]
    assert extractor.feature_info.reduction() == [8, 16]
    with torch.no_grad():
        feats = extractor(torch.randn(2, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 32, 32), (2, 112, 16, 16)]
    converted = _converted("tf_efficientnet_lite0")
    for key, value in extractor.state_dict().items():  # features_only loading is non-strict in timm
        assert torch.equal(value, converted[key]), key


def test_normalization() -> None:
    assert backbone_normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std = backbone_normalization(f"{VIT}.moleflow_offline")
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(RuntimeError, match="no_such_net"):
        backbone_normalization("no_such_net")


def test_cache_is_reused_and_repaired() -> None:
    path = offline_weights_path("tf_efficientnet_lite0")
    mtime = path.stat().st_mtime_ns
    assert offline_weights_path("tf_efficientnet_lite0.moleflow_offline") == path
    assert path.stat().st_mtime_ns == mtime  # not reconverted
    path.write_bytes(b"truncated")
    assert offline_weights_path("tf_efficientnet_lite0").stat().st_size > 1_000_000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- DINOv2 (ONNX)


@pytest.fixture(scope="module")
def onnx_model():  # noqa: ANN201
    return load_onnx()


def _expected_vit_sources(graph) -> dict[str, list[np.ndarray]]:  # noqa: ANN001
    """Independently derive, per timm key, the ONNX arrays it must equal (Linear weights transposed)."""
    from onnx import numpy_helper

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


def test_dinov2_tensors_equal_onnx_initializers(onnx_model) -> None:  # noqa: ANN001
    converted = _converted(VIT)
    model = timm.create_model(VIT, pretrained=False)
    model.load_state_dict(converted, strict=True)
    expected = _expected_vit_sources(onnx_model.graph)
    assert set(expected) == set(converted) == set(model.state_dict())
    for key, parts in expected.items():
        ref = torch.from_numpy(np.concatenate(parts, axis=0))
        assert torch.equal(converted[key], ref), key


def test_dinov2_extractor_matches_onnxruntime(onnx_model, no_download: None) -> None:  # noqa: ANN001
    """timm extractor (blocks 8, 11 at 224 px) vs the same tensors inside the ONNX graph.

    Observed max abs difference ~3e-5 (block 11 activations reach ~16); tolerance 5e-4.
    """
    import onnx
    import onnxruntime as ort

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


def test_vit_img_size_must_fit_patches() -> None:
    with pytest.raises(ValueError, match="multiple"):
        create_feature_extractor(VIT, (11,), img_size=256)


# ----------------------------------------------------------------------------- timm / anomalib integration


def test_register_offline_weights_with_anomalib_extractor(no_download: None) -> None:
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    assert set(OFFLINE_BACKBONES) == {*LITES, VIT}
    tagged = register_offline_weights("tf_efficientnet_lite0")
    assert tagged == "tf_efficientnet_lite0.moleflow_offline"
    assert register_offline_weights(tagged) == tagged  # idempotent
    extractor = TimmFeatureExtractor(backbone=tagged, layers=["blocks.2", "blocks.4"]).eval()
    with torch.no_grad():
        feats = extractor(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in feats.values()] == [(1, 40, 32, 32), (1, 112, 16, 16)]
    converted = _converted("tf_efficientnet_lite0")
    for key, value in extractor.feature_extractor.state_dict().items():
        assert torch.equal(value, converted[key]), key

    vit = TimmFeatureExtractor(backbone=register_offline_weights(VIT), layers=["blocks.8"]).eval()
    assert torch.equal(vit.feature_extractor.blocks[8].attn.qkv.weight, _converted(VIT)["blocks.8.attn.qkv.weight"])


def test_unknown_backbone_error() -> None:
    with pytest.raises(RuntimeError, match=r"no_such_net.*tf_efficientnet_lite0"):
        create_feature_extractor("no_such_net", (1, 2))


def test_download_failure_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A normal timm name whose weights are not cached fails with a clear message when offline."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", _raise_offline)  # noqa: SLF001
    with pytest.raises(RuntimeError, match=r"'resnet18'.*tf_efficientnet_lite0") as info:
        create_feature_extractor("resnet18", (1, 2))
    assert "HF_HUB_OFFLINE" in str(info.value)


def _raise_offline(*args: object, **kwargs: object) -> None:
    msg = "no network"
    raise OSError(msg)
