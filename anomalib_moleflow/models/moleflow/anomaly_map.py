"""Anomaly map and image score from per-patch scores."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import IMAGE_SCORES
from .loss import top_k_mean


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (``0 <= q <= 1``) of each row of ``(B, N)``, interpolated linearly between
    the two nearest order statistics as ``torch.quantile`` does; computed from the row's top
    ``N - floor(q (N - 1))`` values (``torch.quantile`` has no ONNX export, ``topk`` does)."""
    n = values.shape[1]
    position = q * (n - 1)
    low = min(math.floor(position), n - 1)
    fraction = position - low
    top = values.topk(n - low, dim=1).values  # descending: the last is order statistic ``low``
    below = top[:, -1]
    if fraction == 0.0 or n - low < 2:
        return below
    return below + fraction * (top[:, -2] - below)


def image_scores(patch_scores: torch.Tensor, mode: str, top_k: int) -> torch.Tensor:
    """Image score ``(B,)`` of ``(B, N)`` patch scores: ``top_k_mean`` of the ``top_k`` largest,
    ``max`` or ``p99`` (99th percentile)."""
    if mode == "top_k_mean":
        return top_k_mean(patch_scores, top_k)
    if mode == "max":
        return patch_scores.amax(dim=1)
    if mode == "p99":
        return percentile(patch_scores, 0.99)
    msg = f"image_score must be one of {', '.join(repr(m) for m in IMAGE_SCORES)}, got {mode!r}"
    raise ValueError(msg)


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
        top_k: Number of highest patch scores averaged into the image score (``top_k_mean``).
        image_score: ``top_k_mean``, ``max`` or ``p99`` (see :func:`image_scores`).
    """

    def __init__(self, input_size: tuple[int, int], sigma: float = 4.0, top_k: int = 3, image_score: str = "top_k_mean") -> None:
        super().__init__()
        if image_score not in IMAGE_SCORES:
            msg = f"AnomalyMapGenerator image_score must be one of {', '.join(repr(m) for m in IMAGE_SCORES)}, got {image_score!r}"
            raise ValueError(msg)
        self.input_size = tuple(input_size)
        self.top_k = top_k
        self.image_score_mode = image_score
        self.blur: nn.Module | None = None
        if sigma > 0:
            kernel = 2 * int(4.0 * sigma + 0.5) + 1
            self.blur = SeparableGaussianBlur(sigma, kernel)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Each image's score ``(B,)`` from its patch scores ``(B, H, W)``: by default the mean of
        its ``top_k`` largest."""
        mode = getattr(self, "image_score_mode", "top_k_mean")  # absent from generators pickled before it existed
        return image_scores(patch_scores.flatten(1), mode, self.top_k)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, 1, H_in, W_in)`` anomaly map."""
        amap = F.interpolate(patch_scores[:, None], size=self.input_size, mode="bilinear", align_corners=False)
        if self.blur is not None:
            amap = self.blur(amap)
        return amap
