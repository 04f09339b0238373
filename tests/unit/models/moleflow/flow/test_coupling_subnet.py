"""Coupling subnet of the shared flow: widths, LoRA linears, the spatial context branch (global
alpha or patch-wise gate) and its shared parameters."""

from __future__ import annotations

import pytest
import torch

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.experts import LoRALinear
from anomalib_moleflow.models.moleflow.flow import MoLEContextSubnet


def _subnet(in_channels: int = 4, out_channels: int = 8, **overrides: object) -> MoLEContextSubnet:
    """A subnet of the given widths, 3 x 3 context kernel, rank-2 LoRA, grid set to 3 x 3."""
    torch.manual_seed(0)
    config = MoLEFlowConfig.from_dict({"context_kernel": 3, "lora_rank": 2, **overrides})
    subnet = MoLEContextSubnet(in_channels, out_channels, config)
    subnet.grid_size = (3, 3)
    return subnet


def test_widths_and_lora_linears() -> None:
    subnet = _subnet(4, 8, subnet_hidden_ratio=3.0)
    assert subnet.half == 4
    layers = subnet.lora_layers()
    assert len(layers) == 4 and all(isinstance(layer, LoRALinear) for layer in layers)
    assert (subnet.s_hidden.in_features, subnet.s_hidden.out_features) == (8, 12)  # [x1, ctx] -> hidden
    assert (subnet.t_hidden.in_features, subnet.t_out.out_features) == (4, 4)
    assert {layer.rank for layer in layers} == {2}
    assert _subnet(4, 8, subnet_hidden_ratio=0.5).s_hidden.out_features == 8  # at least 8 hidden units
    assert _subnet(4, 8, use_context=False).s_hidden.in_features == 4
    out = subnet(torch.randn(18, 4))
    assert out.shape == (18, 8)


def test_odd_output_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="even output width, got 7"):
        _subnet(4, 7)


def test_alpha_starts_at_the_configured_scale_and_stays_bounded() -> None:
    subnet = _subnet(context_init_scale=0.1, context_max_alpha=0.2)
    assert subnet.context_alpha() == pytest.approx(0.1, rel=1e-6)
    with torch.no_grad():
        subnet.context_scale_param.fill_(50.0)
    assert subnet.context_alpha() == pytest.approx(0.2)
    assert _subnet(use_context=False).context_alpha() is None
    assert _subnet(use_context_gate=True).context_alpha() is None


def test_context_parameters_are_conv_and_alpha_or_gate() -> None:
    alpha = _subnet()
    assert {id(p) for p in alpha.context_parameters()} == {
        id(alpha.context_conv.weight),
        id(alpha.context_conv.bias),
        id(alpha.context_scale_param),
    }
    gate = _subnet(use_context_gate=True, context_gate_hidden=5)
    assert len(gate.context_parameters()) == 2 + 4  # conv weight and bias, two gate linears
    assert gate.context_gate_net[0].out_features == 5
    assert _subnet(use_context=False).context_parameters() == []
    lora = {id(p) for layer in alpha.lora_layers() for p in layer.parameters()}
    assert not lora & {id(p) for p in alpha.context_parameters()}


def test_scale_branch_sees_the_neighbours_and_translation_branch_does_not() -> None:
    subnet = _subnet()
    x = torch.randn(9, 4)  # one 3 x 3 grid
    out = subnet(x)
    nudged = x.clone()
    nudged[4] += 1.0  # the centre patch
    changed = subnet(nudged) - out
    s, t = changed[:, :4], changed[:, 4:]
    assert s[0].abs().sum() > 0  # a corner patch's scale sees the centre through the context conv
    assert torch.equal(t[0], torch.zeros(4))  # its translation only sees the patch itself
    plain = _subnet(use_context=False)
    assert torch.equal((plain(nudged) - plain(x))[0], torch.zeros(8))


def test_context_is_alpha_times_the_depthwise_conv() -> None:
    subnet = _subnet()
    x = torch.randn(18, 4)  # two images of 3 x 3
    spatial = x.reshape(2, 3, 3, 4).permute(0, 3, 1, 2)
    conv = subnet.context_conv(spatial).permute(0, 2, 3, 1).reshape(18, 4)
    torch.testing.assert_close(subnet._context(x), subnet.context_alpha() * conv)


def test_gate_starts_at_one_half_of_the_context() -> None:
    subnet = _subnet(use_context_gate=True)
    x = torch.randn(9, 4)
    spatial = x.reshape(1, 3, 3, 4).permute(0, 3, 1, 2)
    conv = subnet.context_conv(spatial).permute(0, 2, 3, 1).reshape(9, 4)
    torch.testing.assert_close(subnet._context(x), 0.5 * conv)  # zero-initialised gate: sigmoid(0)


def test_context_needs_the_grid() -> None:
    subnet = _subnet()
    subnet.grid_size = None
    with pytest.raises(RuntimeError, match="grid_size must be set"):
        subnet(torch.randn(9, 4))
    no_context = _subnet(use_context=False)  # without context no grid is needed
    no_context.grid_size = None
    assert no_context(torch.randn(5, 4)).shape == (5, 8)


def test_task_experts_route_through_every_linear() -> None:
    subnet = _subnet()
    x = torch.randn(9, 4)
    base = subnet(x)
    for layer in subnet.lora_layers():
        layer.add_adapter("0")
        layer.set_adapter("0")
    assert torch.equal(subnet(x), base)  # identity start
    with torch.no_grad():
        subnet.t_out.task_bias["0"].fill_(1.0)
    assert torch.allclose(subnet(x)[:, 4:], base[:, 4:] + 1.0)
    assert torch.equal(subnet(x)[:, :4], base[:, :4])
