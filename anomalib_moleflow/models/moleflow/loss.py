"""MoLE-Flow training loss: per-patch NLL with a tail-aware term and small regularisers.

``nll = 0.5 * ||z||^2 - log|det J|`` per patch (the constant ``C/2 log 2 pi`` is dropped).
For optimisation it is divided by the feature width ``C`` (nats per dimension), so the
learning rate does not depend on the backbone.

Options from the notes and the public implementation:
* tail-aware loss: ``(1 - w) * mean(nll) + w * mean(top-q% nll of each image)``;
* log-det regulariser: ``lambda * mean((log|det J| / C)^2)``;
* v5 centre loss ``lambda * mean(||z||^2 / C)`` and v7 focal NLL ``(1 - p)^gamma * nll``
  with ``p = exp(-nll / C)`` (both failed experiments, kept for reproduction).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patch_nll(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-patch negative log-likelihood ``(B, H, W)`` in nats (constant dropped)."""
    return 0.5 * (z**2).sum(dim=-1) - log_jac_det


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest entries of each row of ``(B, N)``."""
    k = max(1, min(k, values.shape[1]))
    return values.topk(k, dim=1).values.mean(dim=1)


class MoLEFlowLoss(nn.Module):
    """Loss of one training step.

    Args:
        tail_weight: Weight ``w`` of the tail term (0 disables it).
        tail_top_ratio: Fraction of each image's patches in the tail.
        logdet_reg: Weight of the log-det regulariser.
        center_loss_weight: v5 centre-loss weight.
        focal_gamma: v7 focal exponent (0 = plain NLL).
    """

    def __init__(
        self,
        tail_weight: float = 1.0,
        tail_top_ratio: float = 0.02,
        logdet_reg: float = 1e-4,
        center_loss_weight: float = 0.0,
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__()
        self.tail_weight = tail_weight
        self.tail_top_ratio = tail_top_ratio
        self.logdet_reg = logdet_reg
        self.center_loss_weight = center_loss_weight
        self.focal_gamma = focal_gamma

    def forward(self, z: torch.Tensor, log_jac_det: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss and its parts (detached) for logging."""
        channels = z.shape[-1]
        nll = patch_nll(z, log_jac_det).flatten(1) / channels  # (B, HW), nats per dim
        if self.focal_gamma > 0:
            prob = torch.exp(-nll.clamp(min=0.0, max=20.0))
            weighted = (1 - prob).pow(self.focal_gamma) * nll
        else:
            weighted = nll
        mean_term = weighted.mean()
        parts = {"nll": nll.mean().detach()}
        loss = mean_term
        if self.tail_weight > 0:
            k = max(1, math.ceil(self.tail_top_ratio * nll.shape[1]))
            tail_term = top_k_mean(weighted, k).mean()
            loss = (1 - self.tail_weight) * mean_term + self.tail_weight * tail_term
            parts["tail"] = tail_term.detach()
        if self.logdet_reg > 0:
            reg = self.logdet_reg * ((log_jac_det / channels) ** 2).mean()
            loss = loss + reg
            parts["logdet_reg"] = reg.detach()
        if self.center_loss_weight > 0:
            center = self.center_loss_weight * ((z**2).sum(dim=-1) / channels).mean()
            loss = loss + center
            parts["center"] = center.detach()
        return loss, parts
