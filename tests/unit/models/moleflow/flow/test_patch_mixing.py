"""Shared patch mixers before the flow: spatial mixer and multi-scale context."""

from __future__ import annotations

import torch

from anomalib_moleflow.models.moleflow.flow.patch_mixing import (
    LightweightMSContext,
    SpatialMixer,
)


def test_spatial_mixer_averages_with_uniform_kernel_and_keeps_constants() -> None:
    mixer = SpatialMixer(3, kernel_size=3)
    const = torch.full((1, 4, 4, 3), 2.5)
    assert torch.allclose(mixer(const), const)  # a convex kernel keeps constant fields
    x = torch.zeros(1, 5, 5, 3)
    x[0, 2, 2] = 9.0
    y = mixer(x)
    # gate 0.5: half the spike stays, half is spread uniformly over the 3x3 neighbourhood
    assert torch.allclose(y[0, 2, 2], torch.full((3,), 4.5 + 0.5))
    assert torch.allclose(y[0, 1, 1], torch.full((3,), 0.5))


def test_ms_context_shape_and_gate() -> None:
    ctx = LightweightMSContext(4, dilations=(1, 2))
    x = torch.randn(2, 6, 6, 4)
    y = ctx(x)
    assert y.shape == x.shape
    # the gate starts at sigmoid(0) = 0.5: x plus half the fused dilated context
    spatial = x.permute(0, 3, 1, 2)
    fused = ctx.fusion(torch.cat([conv(spatial) for conv in ctx.dilated_convs], dim=1)).permute(0, 2, 3, 1)
    assert torch.allclose(y, x + 0.5 * fused, atol=1e-6)
    assert [conv.dilation for conv in ctx.dilated_convs] == [(1, 1), (2, 2)]
    with torch.no_grad():
        ctx.gate.fill_(-1e4)  # a closed gate is the identity
    assert torch.allclose(ctx(x), x)


def test_spatial_mixer_kernel_stays_convex_whatever_its_logits() -> None:
    """A softmax kernel cannot shrink features to a point (which would let the NLL collapse)."""
    mixer = SpatialMixer(2, kernel_size=3)
    with torch.no_grad():
        mixer.kernel_logits.normal_(std=5.0)
        mixer.gate.fill_(3.0)
    const = torch.full((2, 5, 4, 2), -1.5)
    assert torch.allclose(mixer(const), const, atol=1e-6)  # also at the borders (replicate padding)
    x = torch.rand(1, 6, 6, 2)
    y = mixer(x)
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6


def test_spatial_mixer_gradients_reach_kernel_and_gate() -> None:
    mixer = SpatialMixer(3, kernel_size=3)
    mixer(torch.rand(1, 4, 4, 3)).square().sum().backward()
    assert mixer.kernel_logits.grad is not None and mixer.gate.grad is not None
    assert mixer.gate.grad.abs().item() > 0
