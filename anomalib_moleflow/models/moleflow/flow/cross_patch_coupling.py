"""Cross-Patch Coupling Flow (CPCF, notes v4): couplings conditioned on each patch's neighbourhood.

A standard coupling computes ``y2 = x2 * exp(s(x1)) + t(x1)`` per patch; CPCF computes
``y2 = x2 * exp(s(x1, ctx)) + t(x1, ctx)`` with ``ctx`` taken from the patch's neighbours on the
patch grid, so the flow models ``p(x_i | N(i))`` rather than ``p(x_i)``.

The coupling subnets (:class:`~.coupling_subnet.MoLEContextSubnet`) already carry a context branch
(``flow.use_context``); ``flow.use_cpcf`` turns it into CPCF: the context then reaches both the
scale and the translation branch, unscaled (the notes' CPCF has no bounded alpha and no gate). The
context is computed from the passive halves ``x1`` of all patches only, never from an ``x2``: the
coupling leaves ``x1`` unchanged, so the inverse recomputes the same context from its output, and
the Jacobian over all patches stays block-triangular, its log-determinant the sum of the per-patch
``sum(s)`` (the flow's per-patch log-det still adds up to the exact total).

The neighbourhood extractor is the subnet's depthwise conv (``flow.context_kernel``, the notes'
``--cpcf_context_kernel``), or, with ``flow.cpcf_use_attention`` (the notes' ``--cpcf_use_attention``),
the :class:`NeighborhoodAttention` of this module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NeighborhoodAttention"]


class NeighborhoodAttention(nn.Module):
    """Each patch attends over its ``k x k`` neighbourhood on the patch grid (itself included):
    ``ctx_i = sum_j softmax_j(q_i . k_j / sqrt(d)) x_j`` over the neighbours ``j`` inside the grid.

    Takes and returns channels-first ``(N, C, H, W)`` maps, the layout of the depthwise conv it
    stands in for. The values are the patches themselves (no value projection) and the query
    projection starts at zero, so the context starts as the plain mean of each patch's neighbours
    inside the grid (no zero padding counted) and learns from there which neighbours matter.
    Neighbours are gathered by shifting a padded copy of the map ``k * k`` times (operators every
    export runtime has).

    Args:
        channels: Channels ``C`` of the map.
        kernel_size: Odd neighbourhood size ``k``.
        key_dim: Width of queries and keys (default ``max(8, C // 4)``).
    """

    def __init__(self, channels: int, kernel_size: int = 3, key_dim: int | None = None) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            msg = f"NeighborhoodAttention kernel_size must be odd and >= 1, got {kernel_size}"
            raise ValueError(msg)
        if channels < 1:
            msg = f"NeighborhoodAttention channels must be >= 1, got {channels}"
            raise ValueError(msg)
        self.kernel_size = kernel_size
        self.key_dim = key_dim if key_dim is not None else max(8, channels // 4)
        if self.key_dim < 1:
            msg = f"NeighborhoodAttention key_dim must be >= 1, got {key_dim}"
            raise ValueError(msg)
        self.query = nn.Linear(channels, self.key_dim)
        self.key = nn.Linear(channels, self.key_dim)
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)

    def _shifted(self, padded: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(..., H, W, k * k, D)`` neighbours of every position of a padded ``(..., H + 2r, W + 2r, D)`` map."""
        k = self.kernel_size
        views = [padded[..., dy : dy + height, dx : dx + width, :] for dy in range(k) for dx in range(k)]
        return torch.stack(views, dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Context map ``(N, C, H, W)`` of ``x (N, C, H, W)``."""
        _, _, height, width = x.shape
        r = self.kernel_size // 2
        patches = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        query = self.query(patches)
        pad = (0, 0, r, r, r, r)
        keys = self._shifted(nn.functional.pad(self.key(patches), pad), height, width)  # (N, H, W, k2, d)
        values = self._shifted(nn.functional.pad(patches, pad), height, width)  # (N, H, W, k2, C)
        inside = self._shifted(nn.functional.pad(x.new_ones(1, height, width, 1), pad), height, width)[..., 0] > 0
        logits = (keys * query[..., None, :]).sum(dim=-1) / math.sqrt(self.key_dim)  # (N, H, W, k2)
        logits = torch.where(inside, logits, torch.full_like(logits, torch.finfo(logits.dtype).min))
        attention = torch.softmax(logits, dim=-1)
        context = (attention[..., None] * values).sum(dim=-2)
        return context.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        """Kernel size and key width."""
        return f"kernel_size={self.kernel_size}, key_dim={self.key_dim}"
