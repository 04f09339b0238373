"""Anomaly map and image score from per-patch scores."""

from __future__ import annotations

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .loss import top_k_mean


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
            self.blur = GaussianBlur2d(kernel_size=(kernel, kernel), sigma=(sigma, sigma), channels=1)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Mean of each image's ``top_k`` patch scores, ``(B,)``."""
        return top_k_mean(patch_scores.flatten(1), self.top_k)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, 1, H_in, W_in)`` anomaly map."""
        amap = F.interpolate(patch_scores[:, None], size=self.input_size, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return amap
