"""Deep Invertible Adapter (DIA, notes V3-3): a small per-task flow after the base flow.

Each block is an affine coupling with MLP subnets whose last layers start at zero, so
a new adapter is the identity; the log-scale is clamped by ``clamp * tanh(s / clamp)``.
Blocks follow FrEIA's contract: ``forward([x], rev) -> ((y,), log_jac_det)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import InvertibleModule
from torch import nn


class SimpleSubnet(nn.Sequential):
    """Three-layer MLP whose output layer starts at zero."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


class AffineCouplingBlock(InvertibleModule):
    """``y2 = x2 * exp(s(x1)) + t(x1)`` on ``(N, C)`` inputs, with a clamped scale."""

    def __init__(
        self,
        dims_in: list[tuple[int, ...]],
        dims_c: list[tuple[int, ...]] | None = None,
        hidden_dim: int = 128,
        clamp: float = 1.9,
        swap: bool = False,
    ) -> None:
        super().__init__(dims_in, dims_c or [])
        channels = dims_in[0][0]
        self.clamp = clamp
        self.swap = swap
        self.len1 = channels - channels // 2 if not swap else channels // 2
        self.len2 = channels - self.len1
        self.s_net = SimpleSubnet(self.len1, self.len2, hidden_dim)
        self.t_net = SimpleSubnet(self.len1, self.len2, hidden_dim)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.swap:
            x2, x1 = torch.split(x, [self.len2, self.len1], dim=1)
        else:
            x1, x2 = torch.split(x, [self.len1, self.len2], dim=1)
        return x1, x2

    def _merge(self, x1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return torch.cat([y2, x1], dim=1) if self.swap else torch.cat([x1, y2], dim=1)

    def forward(
        self,
        x: Iterable[torch.Tensor],
        c: Iterable[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """FrEIA contract: +log|det J| forward, -log|det J| in reverse."""
        del c, jac
        x1, x2 = self._split(next(iter(x)))
        s = self.s_net(x1)
        s = self.clamp * torch.tanh(s / self.clamp)
        t = self.t_net(x1)
        if not rev:
            y2 = x2 * torch.exp(s) + t
            log_jac_det = s.sum(dim=1)
        else:
            y2 = (x2 - t) * torch.exp(-s)
            log_jac_det = -s.sum(dim=1)
        return (self._merge(x1, y2),), log_jac_det

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shape-preserving."""
        return input_dims


class DeepInvertibleAdapter(nn.Module):
    """Per-task mini-flow applied to base-flow latents ``(B, H, W, C)``.

    Args:
        channels: Latent width.
        n_blocks: Number of coupling blocks (alternating halves).
        hidden_ratio: MLP hidden width relative to ``channels``.
        clamp: Scale clamp.
    """

    def __init__(self, channels: int, n_blocks: int = 2, hidden_ratio: float = 1.0, clamp: float = 1.9) -> None:
        super().__init__()
        hidden = max(8, int(round(channels * hidden_ratio)))
        self.inn = SequenceINN(channels)
        for i in range(n_blocks):
            self.inn.append(AffineCouplingBlock, hidden_dim=hidden, clamp=clamp, swap=bool(i % 2))

    def forward(self, z: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z', log_jac_det)`` with the log-det per patch ``(B, H, W)``."""
        batch, height, width, channels = z.shape
        out, log_jac_det = self.inn(z.reshape(-1, channels), rev=rev)
        return out.reshape(batch, height, width, channels), log_jac_det.reshape(batch, height, width)
