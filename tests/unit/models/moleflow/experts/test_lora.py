"""LoRA linear: identity start, per-task separation, scaling rules, merged inference weights."""

from __future__ import annotations

import pytest
import torch

from anomalib_moleflow.models.moleflow.experts import LoRALinear


def test_new_adapter_is_identity_and_trained_adapter_is_not() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(6, 4, rank=2)
    x = torch.randn(5, 6)
    base = layer(x)
    layer.add_adapter("0")
    layer.set_adapter("0")
    assert torch.equal(layer(x), base)
    torch.nn.init.normal_(layer.lora_B["0"].weight)
    assert not torch.allclose(layer(x), base)
    layer.set_adapter(None)
    assert torch.equal(layer(x), base)


def test_adapters_are_separate() -> None:
    layer = LoRALinear(6, 4, rank=2)
    layer.add_adapter("0")
    layer.add_adapter("1")
    p0 = {id(p) for p in layer.adapter_parameters("0")}
    p1 = {id(p) for p in layer.adapter_parameters("1")}
    assert p0.isdisjoint(p1)
    assert len(p0) == 3  # A, B, bias


@pytest.mark.parametrize(("rule", "expected"), [("alpha/rank", 0.25), ("alpha/(2*rank)", 0.125)])
def test_scaling_rules(rule: str, expected: float) -> None:
    assert LoRALinear(4, 4, rank=4, alpha=1.0, scaling_rule=rule).scaling == expected


def test_duplicate_adapter_rejected() -> None:
    layer = LoRALinear(4, 4)
    layer.add_adapter("0")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("0")


def test_inference_uses_merged_weights_and_follows_updates() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(12, 8, rank=4)
    layer.add_adapter("0")
    layer.set_adapter("0")
    torch.nn.init.normal_(layer.lora_B["0"].weight)
    torch.nn.init.normal_(layer.task_bias["0"])
    x = torch.randn(5, 12)
    unmerged = layer(x)  # grad enabled: base + low-rank path
    with torch.no_grad():
        merged = layer(x)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    with torch.no_grad():
        layer.lora_B["0"].weight.mul_(2.0)  # an optimiser step changes the expert in place
        after = layer(x)
    assert not torch.allclose(after, merged, atol=1e-3)
    assert torch.allclose(after, layer(x).detach(), atol=1e-5)


def test_output_is_base_plus_scaled_low_rank_update_plus_bias() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(6, 4, rank=2, alpha=3.0)
    layer.add_adapter("0")
    layer.set_adapter("0")
    for p in layer.adapter_parameters("0"):
        torch.nn.init.normal_(p)
    x = torch.randn(5, 6)
    a, b, bias = layer.lora_A["0"].weight, layer.lora_B["0"].weight, layer.task_bias["0"]
    expected = x @ layer.base.weight.T + layer.base.bias + 1.5 * (x @ a.T @ b.T) + bias
    assert layer.scaling == 1.5
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)  # the merged path gives the same


def test_lora_and_task_bias_can_each_be_off() -> None:
    no_lora = LoRALinear(4, 3, use_lora=False)
    no_lora.add_adapter("0")
    assert "0" not in no_lora.lora_A and len(no_lora.adapter_parameters("0")) == 1
    no_lora.add_adapter("1", lora=True)  # per-expert override (v1: base-only task 0)
    assert "1" in no_lora.lora_A
    no_bias = LoRALinear(4, 3, use_task_bias=False)
    no_bias.add_adapter("0")
    assert "0" not in no_bias.task_bias and len(no_bias.adapter_parameters("0")) == 2
    with_lora = LoRALinear(4, 3)
    with_lora.add_adapter("0", lora=False)
    assert "0" not in with_lora.lora_A and "0" in with_lora.task_bias
    assert with_lora.adapter_parameters("unknown") == []


def test_new_adapters_follow_the_base_dtype() -> None:
    layer = LoRALinear(4, 3).double()
    layer.add_adapter("0")
    assert layer.lora_A["0"].weight.dtype == layer.lora_B["0"].weight.dtype == torch.float64
    assert layer.task_bias["0"].dtype == torch.float64


def test_merged_weights_are_cached_per_expert() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(5, 3, rank=2)
    for key in ("0", "1"):
        layer.add_adapter(key)
        torch.nn.init.normal_(layer.lora_B[key].weight)
    w0, _ = layer.merged_weights("0")
    assert layer.merged_weights("0")[0] is w0  # unchanged parameters: cached
    w1, _ = layer.merged_weights("1")
    assert not torch.equal(w0, w1)
    assert torch.equal(layer.merged_weights("0")[0], w0)  # switching back recomputes the same


def test_routed_weights_score_each_images_rows_with_its_own_expert() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(6, 4, rank=2)
    for key in ("0", "1"):
        layer.add_adapter(key)
        torch.nn.init.normal_(layer.lora_B[key].weight, std=0.3)
        torch.nn.init.normal_(layer.task_bias[key], std=0.3)
    x = torch.randn(3 * 5, 6)  # 3 images of 5 patches, image-major
    route = torch.tensor([1, 0, 1])
    merged = {key: layer.merged_weights(key) for key in ("0", "1")}
    layer.routed = (
        torch.stack([merged[str(int(t))][0] for t in route]),
        torch.stack([merged[str(int(t))][1] for t in route]),
    )
    with torch.no_grad():
        got = layer(x)
        layer.routed = None
        for image, task in enumerate(route.tolist()):
            layer.set_adapter(str(task))
            rows = slice(5 * image, 5 * image + 5)
            assert torch.allclose(got[rows], layer(x[rows]), atol=1e-6), image
    assert not torch.allclose(got[:5], got[5:10])  # the experts differ
