"""Coupling subnet of the shared flow: LoRA linears plus a spatial context branch.

The affine coupling block hands the subnet the passive half ``x1`` of every patch as a
flat ``(B*H*W, C1)`` tensor. The subnet returns ``[s, t]``: the scale branch sees
``[x1, ctx]`` where ``ctx`` is a depthwise convolution of ``x1`` over the patch grid
(scaled by a bounded global alpha, or by a per-patch gate in "Baseline 2.0"); the
translation branch sees ``x1``. All four linears are :class:`LoRALinear`, or SC-LoRA's
:class:`~..experts.spatial_lora.SpatialLoRALinear` with ``experts.lora_kind="spatial_contextual"``.

With ``flow.use_cpcf`` (lower-case v4 Cross-Patch Coupling Flow) both branches see ``[x1, ctx]``,
with ``ctx`` unscaled, and ``flow.cpcf_use_attention`` swaps the conv for a neighbourhood
attention (:mod:`.cross_patch_coupling`). The context comes from ``x1`` only, so the coupling stays
invertible with an exact per-patch log-det.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ..config import MoLEFlowConfig
from ..experts.lora import LoRALinear
from ..experts.spatial_lora import SpatialLoRALinear
from .cross_patch_coupling import NeighborhoodAttention


def _inverse_sigmoid(p: float) -> float:
    p = min(max(p, 0.01), 0.99)
    return float(torch.log(torch.tensor(p / (1 - p))))


class MoLEContextSubnet(nn.Module):
    """Subnet ``x1 -> [s, t]`` with per-task LoRA experts and a shared context conv."""

    def __init__(self, in_channels: int, out_channels: int, config: MoLEFlowConfig) -> None:
        super().__init__()
        if out_channels % 2:
            msg = f"coupling subnet needs an even output width, got {out_channels}"
            raise ValueError(msg)
        self.half = out_channels // 2
        flow, experts = config.flow, config.experts
        hidden = max(8, int(round(flow.subnet_hidden_ratio * in_channels)))

        spatial = experts.lora_kind == "spatial_contextual"

        def linear(i: int, o: int) -> LoRALinear:
            kwargs = {"grid_size": experts.sc_lora_grid_size} if spatial else {}
            return (SpatialLoRALinear if spatial else LoRALinear)(
                i,
                o,
                rank=experts.lora_rank,
                alpha=experts.lora_alpha,
                scaling_rule=experts.lora_scaling,
                use_lora=experts.use_lora,
                use_task_bias=experts.use_task_bias,
                **kwargs,
            )

        self.spatial_lora = spatial
        """SC-LoRA linears: they need the patch grid on every forward."""
        self.use_context = flow.use_context
        self.use_cpcf = self.use_context and flow.use_cpcf
        """CPCF: the translation branch sees the context too, and the context is not scaled."""
        self.grid_size: tuple[int, int] | None = None
        s_in = in_channels * 2 if self.use_context else in_channels
        self.s_hidden = linear(s_in, hidden)
        self.s_out = linear(hidden, self.half)
        self.t_hidden = linear(in_channels * 2 if self.use_cpcf else in_channels, hidden)
        self.t_out = linear(hidden, self.half)

        self.context_conv: nn.Module | None = None
        """The neighbourhood extractor on ``(N, C, H, W)`` maps: a depthwise conv, CPCF's
        :class:`~.cross_patch_coupling.NeighborhoodAttention`, or v4.1's fixed mean."""
        self.context_scale_param: nn.Parameter | None = None
        self.context_gate_net: nn.Sequential | None = None
        self.context_max_alpha = flow.context_max_alpha
        if self.use_context:
            k = flow.context_kernel
            if self.use_cpcf and flow.cpcf_use_attention:
                self.context_conv = NeighborhoodAttention(in_channels, k)
            else:
                self.context_conv = nn.Conv2d(in_channels, in_channels, k, padding=k // 2, groups=in_channels)
            # CPCF's context enters the coupling unscaled: neither gate nor alpha
            if flow.use_context_gate and not self.use_cpcf:
                self.context_gate_net = nn.Sequential(
                    nn.Linear(in_channels * 2, flow.context_gate_hidden),
                    nn.ReLU(),
                    nn.Linear(flow.context_gate_hidden, 1),
                )
                for layer in (self.context_gate_net[0], self.context_gate_net[2]):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
            elif not self.use_cpcf:
                init = _inverse_sigmoid(flow.context_init_scale / flow.context_max_alpha)
                self.context_scale_param = nn.Parameter(torch.tensor([init]))

    def lora_layers(self) -> list[LoRALinear]:
        """The four expert-carrying linears."""
        return [self.s_hidden, self.s_out, self.t_hidden, self.t_out]

    def context_parameters(self) -> list[nn.Parameter]:
        """Shared context parameters (conv, alpha or gate): trained on task 0 only in V4.1."""
        params: list[nn.Parameter] = []
        for module in (self.context_conv, self.context_gate_net):
            if module is not None:
                params += list(module.parameters())
        if self.context_scale_param is not None:
            params.append(self.context_scale_param)
        return params

    def context_alpha(self) -> float | None:
        """Current global context alpha (``None`` in gate mode or without context)."""
        if self.context_scale_param is None:
            return None
        return float(self.context_max_alpha * torch.sigmoid(self.context_scale_param.detach()))

    def get_context_alpha(self) -> float | None:
        """The notes' name for :meth:`context_alpha` (Baseline 1.5's global alpha, for logging)."""
        return self.context_alpha()

    def get_last_gate_stats(self) -> dict[str, float] | None:
        """Mean, std, min and max of the per-patch gate in the last training forward (Baseline 2.0);
        ``None`` without a gate or before one ran.

        Recorded in training mode only, as four detached numbers kept on the device (no copy of the
        gate, no host sync per step), so that evaluation and exported graphs have no side effect;
        read once per epoch for the logger.
        """
        stats = getattr(self, "_last_gate_stats", None)
        if stats is None:
            return None
        return dict(zip(("mean", "std", "min", "max"), stats.tolist(), strict=True))

    def _record_gate(self, gate: torch.Tensor) -> None:
        with torch.no_grad():
            g = gate.detach().float()
            std = g.std() if g.numel() > 1 else g.new_zeros(())
            self._last_gate_stats = torch.stack([g.mean(), std, g.min(), g.max()])

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid_size is None:
            msg = "MoLEContextSubnet.grid_size must be set before the context branch runs"
            raise RuntimeError(msg)
        height, width = self.grid_size
        channels = x.shape[1]
        spatial = x.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
        ctx = self.context_conv(spatial).permute(0, 2, 3, 1).reshape(-1, channels)
        if self.context_gate_net is not None:
            gate = torch.sigmoid(self.context_gate_net(torch.cat([x, ctx], dim=-1)))
            if self.training:
                self._record_gate(gate)
            return gate * ctx
        if self.context_scale_param is None:  # CPCF
            return ctx
        alpha = self.context_max_alpha * torch.sigmoid(self.context_scale_param)
        return alpha * ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``[s, t]`` of shape ``(N, 2 * half)``."""
        if self.spatial_lora:
            for layer in self.lora_layers():
                layer.patch_grid = self.grid_size
        s_input = torch.cat([x, self._context(x)], dim=-1) if self.use_context else x
        s = self.s_out(F.relu(self.s_hidden(s_input)))
        t = self.t_out(F.relu(self.t_hidden(s_input if self.use_cpcf else x)))
        return torch.cat([s, t], dim=-1)
