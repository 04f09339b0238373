"""Cross-Patch Coupling Flow: the neighbourhood attention, both coupling branches conditioned on the
unscaled context, and the flow with CPCF (conv or attention, standard or SC-LoRA) inverting to 1e-5
with its summed per-patch log-det equal to log|det| of the Jacobian over all patches."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.nn import functional as F

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.flow import MoLEContextSubnet, SharedFlow
from anomalib_moleflow.models.moleflow.flow.cross_patch_coupling import NeighborhoodAttention

VARIANTS = {
    "conv": {"use_cpcf": True},
    "attention": {"use_cpcf": True, "cpcf_use_attention": True},
    "attention-sc-lora": {"use_cpcf": True, "cpcf_use_attention": True, "lora_kind": "spatial_contextual", "sc_lora_grid_size": 2},
    "conv-sc-lora": {"use_cpcf": True, "lora_kind": "spatial_contextual", "sc_lora_grid_size": 3},
}


def _randomised_attention(channels: int = 4, kernel: int = 3) -> NeighborhoodAttention:
    torch.manual_seed(0)
    attention = NeighborhoodAttention(channels, kernel)
    torch.nn.init.normal_(attention.query.weight)
    return attention


def test_attention_starts_as_the_mean_of_the_neighbours_inside_the_grid() -> None:
    attention = NeighborhoodAttention(4, 3)
    x = torch.randn(2, 4, 5, 6)
    expected = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)
    assert attention.key_dim == 8 and NeighborhoodAttention(64).key_dim == 16


def test_attention_mixes_only_the_neighbourhood() -> None:
    attention = _randomised_attention()
    x = torch.randn(1, 4, 5, 5)
    out = attention(x)
    assert not torch.allclose(out, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), atol=1e-3)
    nudged = x.clone()
    nudged[0, :, 4, 4] += 3.0  # bottom-right corner
    changed = (attention(nudged) - out).abs().sum(dim=1)[0]
    assert changed[3:, 3:].min() > 0  # its 3 x 3 neighbourhood sees it
    assert torch.all(changed[:3] == 0) and torch.all(changed[:, :3] == 0)  # nothing farther away does
    # a convex combination of the neighbours: within their range per channel
    windows = F.unfold(x, 3, padding=1).view(1, 4, 9, 5, 5)
    inside = F.unfold(torch.ones(1, 1, 5, 5), 3, padding=1).view(1, 1, 9, 5, 5) > 0
    low = torch.where(inside, windows, torch.full_like(windows, float("inf"))).amin(dim=2)
    high = torch.where(inside, windows, torch.full_like(windows, -float("inf"))).amax(dim=2)
    assert torch.all(out >= low - 1e-5) and torch.all(out <= high + 1e-5)


def test_attention_with_kernel_one_is_the_identity_and_bad_sizes_are_refused() -> None:
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(_randomised_attention(3, 1)(x), x)
    with pytest.raises(ValueError, match="kernel_size must be odd and >= 1, got 4"):
        NeighborhoodAttention(4, 4)
    with pytest.raises(ValueError, match="channels must be >= 1"):
        NeighborhoodAttention(0, 3)


def _subnet(**overrides: object) -> MoLEContextSubnet:
    torch.manual_seed(0)
    config = MoLEFlowConfig.from_dict({"context_kernel": 3, "lora_rank": 2, **overrides})
    subnet = MoLEContextSubnet(4, 8, config)
    subnet.grid_size = (3, 3)
    return subnet


@pytest.mark.parametrize("variant", ["conv", "attention"])
def test_both_branches_see_the_neighbours_through_the_unscaled_context(variant: str) -> None:
    subnet = _subnet(**VARIANTS[variant])
    assert subnet.t_hidden.in_features == subnet.s_hidden.in_features == 8  # [x1, ctx]
    assert subnet.context_scale_param is None and subnet.context_gate_net is None and subnet.context_alpha() is None
    assert isinstance(subnet.context_conv, NeighborhoodAttention if variant == "attention" else torch.nn.Conv2d)
    assert {id(p) for p in subnet.context_parameters()} == {id(p) for p in subnet.context_conv.parameters()}
    if variant == "attention":
        torch.nn.init.normal_(subnet.context_conv.query.weight)
    x = torch.randn(9, 4)
    spatial = x.reshape(1, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(subnet._context(x), subnet.context_conv(spatial).permute(0, 2, 3, 1).reshape(9, 4))
    nudged = x.clone()
    nudged[4] += 1.0  # the centre patch
    changed = subnet(nudged) - subnet(x)
    assert changed[0, :4].abs().sum() > 0 and changed[0, 4:].abs().sum() > 0  # a corner's s and t both move


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpcf_flow_inverts_to_1e5(variant: str) -> None:
    flow = _flow(**VARIANTS[variant])
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    z, log_jac = flow(x)
    x_back, log_jac_rev = flow(z, rev=True)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(log_jac_rev, -log_jac, atol=1e-5)
    assert not torch.allclose(z, x, atol=1e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpcf_summed_logdet_matches_the_jacobian_over_all_patches(variant: str) -> None:
    flow = _flow(**VARIANTS[variant])
    x = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    _, log_jac = flow(x)
    jac = jacobian(lambda v: flow(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, log_jac.sum(), atol=1e-6)
    patch = jac.view(6, 6, 6, 6)  # (patch out, channel out, patch in, channel in)
    assert patch[0, :, 5].abs().sum() > 0  # patches really interact (corner out, far corner in)


def _flow(**overrides: object) -> SharedFlow:
    """A float64 three-block CPCF flow with expert "0" active and every expert and context weight randomised."""
    torch.manual_seed(0)
    config = MoLEFlowConfig.from_dict({"n_coupling_blocks": 3, "lora_rank": 2, "context_kernel": 3, **overrides})
    flow = SharedFlow(6, config).double()
    flow.add_adapter("0")
    flow.set_adapter("0")
    for p in flow.adapter_parameters("0"):
        torch.nn.init.normal_(p, std=0.1)
    for subnet in flow.subnets():
        if isinstance(subnet.context_conv, NeighborhoodAttention):
            torch.nn.init.normal_(subnet.context_conv.query.weight, std=0.5)
    return flow
