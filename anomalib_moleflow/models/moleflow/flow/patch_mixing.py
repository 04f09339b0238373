"""Shared modules that mix neighbouring patches before the flow.

* :class:`SpatialMixer` (V3/V4): depthwise k x k averaging kernel (initialised to
  ``1/k^2``) blended with the input through a learned gate. Trained on task 0 only in
  V4/V4.1. Here the kernel is a softmax over its taps, so it stays an average and the
  mixer cannot shrink features to a point (which would let the NLL collapse).
* :class:`LightweightMSContext` (V3-2): dilated depthwise convs fused by a 1x1 conv, added
  through a sigmoid gate. Conflicts with the whitening adapter (the config drops it then).
* :class:`TaskConditionedMSContext` (V3, beside ``LightweightMSContext``): the same dilated convs
  and fusion, shared, with each task's own conditioning of the context (an expert part).
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


class MSContextCondition(nn.Module):
    """One task's conditioning of the multi-scale context: a weight per dilation branch, a
    per-channel scale and shift of the fused context, and the residual gate.

    Starts at weights 1, scale 1, shift 0 and gate ``sigmoid(0) = 0.5``: a new task's context is
    then exactly :class:`LightweightMSContext`'s with the shared convs.
    """

    def __init__(self, channels: int, n_dilations: int) -> None:
        super().__init__()
        self.branch_weights = nn.Parameter(torch.ones(n_dilations))
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.gate = nn.Parameter(torch.zeros(1))


class TaskConditionedMSContext(nn.Module):
    """Multi-scale context whose output each task conditions, on ``(B, H, W, C)``::

        x + sigmoid(gate_t) * (gamma_t * fusion([w_t,d * conv_d(x)]) + beta_t)

    The notes name the module (V3, ``use_task_conditioned_ms_context``) but give no formula; this
    form is the package's choice: the dilated depthwise convs and the 1x1 fusion are shared (trained
    on task 0, frozen after with ``flow.freeze_mixer_after_task0``), and task ``t`` owns the branch
    weights ``w_t``, the channel scale and shift ``gamma_t, beta_t`` and its gate (one
    :class:`MSContextCondition` per task in :attr:`conditions`, created by :meth:`add_task`). What
    task ``t`` trains is its condition alone, so an earlier task's context never changes.
    """

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2, 4), kernel_size: int = 3) -> None:
        super().__init__()
        if not dilations:
            msg = "TaskConditionedMSContext needs at least one dilation"
            raise ValueError(msg)
        self.channels = channels
        self.dilated_convs = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size, padding=d * (kernel_size // 2), dilation=d, groups=channels)
            for d in dilations
        )
        self.fusion = nn.Conv2d(channels * len(dilations), channels, 1)
        self.conditions = nn.ModuleDict()

    def add_task(self, key: str) -> None:
        """Create task ``key``'s condition (the plain multi-scale context at the start)."""
        if key in self.conditions:
            msg = f"TaskConditionedMSContext already has a condition for task {key!r}"
            raise KeyError(msg)
        device = self.fusion.weight.device
        self.conditions[key] = MSContextCondition(self.channels, len(self.dilated_convs)).to(device)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The dilated convs and the fusion, shared by all tasks."""
        return [*self.dilated_convs.parameters(), *self.fusion.parameters()]

    def task_parameters(self, key: str) -> list[nn.Parameter]:
        """Task ``key``'s condition (empty for an unknown key)."""
        return list(self.conditions[key].parameters()) if key in self.conditions else []

    def conditioned(
        self, x: torch.Tensor, branch_weights: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        """The context under explicit conditions, one per image: ``branch_weights (B, n_dilations)``,
        ``gamma, beta (B, C)``, ``gate (B, 1)`` (raw, before the sigmoid)."""
        spatial = x.permute(0, 3, 1, 2)
        branches = [w[:, None, None, None] * conv(spatial) for w, conv in zip(branch_weights.unbind(1), self.dilated_convs, strict=True)]
        context = self.fusion(torch.cat(branches, dim=1)).permute(0, 2, 3, 1)
        context = gamma[:, None, None] * context + beta[:, None, None]
        return x + torch.sigmoid(gate)[:, None, None] * context

    def forward(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """The context of task ``key`` for every image of ``x``."""
        if key not in self.conditions:
            msg = f"TaskConditionedMSContext has no condition for task {key!r}; known: {list(self.conditions)}"
            raise KeyError(msg)
        c = self.conditions[key]
        batch = x.shape[0]
        return self.conditioned(
            x,
            c.branch_weights.expand(batch, -1),
            c.gamma.expand(batch, -1),
            c.beta.expand(batch, -1),
            c.gate.expand(batch, -1),
        )
