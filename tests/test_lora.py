"""LoRA linear: identity start, per-task separation, scaling rules."""

import pytest
import torch

from anomalib_moleflow.models.moleflow.lora import LoRALinear


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
