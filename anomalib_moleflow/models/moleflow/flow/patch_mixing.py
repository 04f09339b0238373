"""Shared modules that mix neighbouring patches before the flow.

* :class:`SpatialMixer` (V3/V4): depthwise k x k averaging kernel (initialised to
  ``1/k^2``) blended with the input through a learned gate. Trained on task 0 only in
  V4/V4.1. Here the kernel is a softmax over its taps, so it stays an average and the
  mixer cannot shrink features to a point (which would let the NLL collapse).
* :class:`LightweightMSContext` (V3-2): dilated depthwise convs fused by a 1x1 conv, added
  through a sigmoid gate. Conflicts with the whitening adapter (the config drops it then).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class SpatialMixer(nn.Module):
    """``y = (1 - g) x + g * avg_k(x)`` with a learned convex kernel and gate, on ``(B, H, W, C)``."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.kernel_logits = nn.Parameter(torch.zeros(channels, 1, kernel_size, kernel_size))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blend each patch with its neighbourhood average."""
        channels = x.shape[-1]
        weights = torch.softmax(self.kernel_logits.flatten(1), dim=1).view_as(self.kernel_logits)
        spatial = x.permute(0, 3, 1, 2)
        mixed = F.conv2d(F.pad(spatial, [self.kernel_size // 2] * 4, mode="replicate"), weights, groups=channels)
        gate = torch.sigmoid(self.gate)
        return ((1 - gate) * spatial + gate * mixed).permute(0, 2, 3, 1)


class LightweightMSContext(nn.Module):
    """Multi-scale context by dilated depthwise convolutions, gated residual."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2, 4), kernel_size: int = 3) -> None:
        super().__init__()
        self.dilated_convs = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size, padding=d * (kernel_size // 2), dilation=d, groups=channels)
            for d in dilations
        )
        self.fusion = nn.Conv2d(channels * len(dilations), channels, 1)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + sigmoid(gate) * fusion([conv_d(x)])`` on ``(B, H, W, C)``."""
        spatial = x.permute(0, 3, 1, 2)
        context = self.fusion(torch.cat([conv(spatial) for conv in self.dilated_convs], dim=1))
        return x + torch.sigmoid(self.gate) * context.permute(0, 2, 3, 1)
