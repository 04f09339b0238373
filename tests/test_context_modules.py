"""Shared spatial mixer and multi-scale context."""

import torch

from anomalib_moleflow.models.moleflow.context_modules import LightweightMSContext, SpatialMixer


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
    assert ctx(x).shape == x.shape
