"""Anomaly map and image score from per-patch scores."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .loss import top_k_mean


class SeparableGaussianBlur(nn.Module):
    """Gaussian smoothing of ``(B, 1, H, W)`` maps as two 1D passes (reflect padding).

    Equal to a 2D Gaussian kernel (anomalib's ``GaussianBlur2d``) up to float rounding,
    at ``2k`` instead of ``k^2`` multiplications per pixel.
    """

    def __init__(self, sigma: float, kernel_size: int) -> None:
        super().__init__()
        offsets = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        self.register_buffer("kernel", (kernel / kernel.sum()).view(1, 1, 1, -1), persistent=False)
        self.pad = kernel_size // 2

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth rows, then columns."""
        kernel = self.kernel.to(maps.dtype)
        maps = F.conv2d(F.pad(maps, (self.pad, self.pad, 0, 0), mode="reflect"), kernel)
        return F.conv2d(F.pad(maps, (0, 0, self.pad, self.pad), mode="reflect"), kernel.transpose(-1, -2))


class AnomalyMapGenerator(nn.Module):
    """Upsample ``(B, H, W)`` patch scores bilinearly to the input size and smooth them.

    Args:
        input_size: ``(height, width)`` of the model input.
        sigma: Gaussian smoothing sigma in pixels (0 disables smoothing).
        top_k: Number of highest patch scores averaged into the image score.
    """

    def __init__(self, input_size: tuple[int, int], sigma: float = 4.0, top_k: int = 3) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.top_k = top_k
        self.blur: nn.Module | None = None
        if sigma > 0:
            kernel = 2 * int(4.0 * sigma + 0.5) + 1
            self.blur = SeparableGaussianBlur(sigma, kernel)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Mean of each image's ``top_k`` patch scores, ``(B,)``."""
        return top_k_mean(patch_scores.flatten(1), self.top_k)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, 1, H_in, W_in)`` anomaly map."""
        amap = F.interpolate(patch_scores[:, None], size=self.input_size, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return amap
