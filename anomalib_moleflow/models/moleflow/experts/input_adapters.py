"""Per-task input adapters placed before the flow.

* :class:`WhiteningAdapter` (notes V3-1, default): LayerNorm without affine, then
  ``gamma * x + beta`` with ``gamma`` in ``[gamma_min, gamma_max]`` via sigmoid and
  ``beta`` in ``[-beta_max, beta_max]`` via tanh; task 0 starts at ``gamma ~ 1``.
* :class:`FiLMAdapter` (notes v3): LayerNorm, FiLM, gated residual MLP; task 0 mixes
  90 % identity with 10 % transformed features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ExpertConfig


class WhiteningAdapter(nn.Module):
    """Whitening then constrained task-specific de-whitening, on ``(B, H, W, C)``."""

    def __init__(
        self,
        channels: int,
        task_index: int = 0,
        gamma_range: tuple[float, float] = (0.5, 2.0),
        beta_max: float = 2.0,
        identity_reg: float = 0.1,
    ) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max = gamma_range
        self.beta_max = beta_max
        self.whiten = nn.LayerNorm(channels, elementwise_affine=False)
        # sigmoid(raw) = (1 - gamma_min) / (gamma_max - gamma_min) gives gamma = 1 exactly for task 0
        # (the notes' -0.7 is this value for the default range, rounded).
        p = (1.0 - self.gamma_min) / (self.gamma_max - self.gamma_min)
        raw0 = float(torch.logit(torch.tensor(p))) if task_index == 0 else 0.0
        self.gamma_raw = nn.Parameter(torch.full((channels,), raw0))
        self.beta_raw = nn.Parameter(torch.zeros(channels))
        self.identity_reg_weight = identity_reg if task_index == 0 else 0.0

    @property
    def gamma(self) -> torch.Tensor:
        """Constrained scale in ``[gamma_min, gamma_max]``."""
        return self.gamma_min + (self.gamma_max - self.gamma_min) * torch.sigmoid(self.gamma_raw)

    @property
    def beta(self) -> torch.Tensor:
        """Constrained shift in ``[-beta_max, beta_max]``."""
        return self.beta_max * torch.tanh(self.beta_raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten each patch vector, then de-whiten with this task's gamma and beta."""
        return self.gamma * self.whiten(x) + self.beta

    def regularization(self) -> torch.Tensor:
        """Pull task 0 toward identity de-whitening (zero for later tasks)."""
        if self.identity_reg_weight <= 0:
            return self.gamma_raw.new_zeros(())
        return self.identity_reg_weight * (((self.gamma - 1.0) ** 2).mean() + (self.beta**2).mean())


class FiLMAdapter(nn.Module):
    """v3 FiLM input adapter: LayerNorm, ``gamma * x + beta``, gated residual MLP."""

    def __init__(self, channels: int, task_index: int = 0) -> None:
        super().__init__()
        hidden = max(channels // 2, 128)
        self.layer_norm = nn.LayerNorm(channels)
        self.film_gamma = nn.Parameter(torch.ones(channels))
        self.film_beta = nn.Parameter(torch.zeros(channels))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.residual_gate = nn.Parameter(torch.tensor([0.5]))
        self.has_reference = task_index > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FiLM-modulated, MLP-refined features; task 0 stays 90 % identity."""
        y = self.film_gamma * self.layer_norm(x) + self.film_beta
        y = y + self.residual_gate * self.mlp(y)
        if not self.has_reference:
            y = 0.9 * x + 0.1 * y
        return y

    def regularization(self) -> torch.Tensor:
        """No regulariser for the FiLM adapter."""
        return self.film_gamma.new_zeros(())


def build_input_adapter(config: ExpertConfig, channels: int, task_index: int) -> nn.Module | None:
    """Factory for the configured adapter kind (``None`` for ``"none"``)."""
    if config.input_adapter == "whitening":
        return WhiteningAdapter(
            channels,
            task_index,
            gamma_range=config.whitening_gamma_range,
            beta_max=config.whitening_beta_max,
            identity_reg=config.whitening_identity_reg,
        )
    if config.input_adapter == "film":
        return FiLMAdapter(channels, task_index)
    return None
