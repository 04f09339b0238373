"""The shared coupling flow: a FrEIA ``SequenceINN`` of all-in-one coupling blocks.

Patches are the flow's batch: the input ``(B, H, W, C)`` is flattened to ``(B*H*W, C)``
so the log-Jacobian determinant comes out per patch. The subnets read the grid size to
run their spatial context branch.

The blocks are anomalib's copy of FrEIA's ``AllInOneBlock`` (same maths and state-dict
keys): FrEIA's own keeps lambdas as attributes, so a model holding it cannot be pickled
and ``anomalib export --export_type torch`` fails; anomalib's copy also draws its
permutation from torch's RNG rather than numpy's.

With ``flow.use_neighborhood_context`` (lower-case v4.1) each subnet's learned context conv is
replaced by the fixed :class:`~.neighborhood_context.NeighborhoodContextExtractor`, so the context
branch has no trainable extractor (its bounded alpha or patch gate remains; with ``flow.use_cpcf``
the context enters both coupling branches unscaled, as the notes' v4.1 feeds it).
"""

from __future__ import annotations

import torch
from anomalib.models.components.flow import AllInOneBlock
from FrEIA.framework import SequenceINN
from torch import nn

from ..config import MoLEFlowConfig
from ..experts.lora import LoRALinear
from .coupling_subnet import MoLEContextSubnet
from .neighborhood_context import NeighborhoodContextExtractor


class SharedFlow(nn.Module):
    """The normalizing flow all tasks share, with LoRA-capable subnets (each task's LoRA pairs and
    biases live in the subnets' linears).

    Args:
        channels: Feature width ``C`` (must be even).
        config: Model configuration.
    """

    def __init__(self, channels: int, config: MoLEFlowConfig) -> None:
        super().__init__()
        if channels % 2:
            msg = f"the coupling flow needs an even feature width, got {channels}"
            raise ValueError(msg)
        self.channels = channels

        flow = config.flow

        def subnet_constructor(c_in: int, c_out: int) -> MoLEContextSubnet:
            subnet = MoLEContextSubnet(c_in, c_out, config)
            if flow.use_neighborhood_context and subnet.context_conv is not None:
                subnet.context_conv = NeighborhoodContextExtractor(flow.neighborhood_kernel, flow.neighborhood_gate)
            return subnet

        self.inn = SequenceINN(channels)
        for _ in range(config.flow.n_coupling_blocks):
            self.inn.append(
                AllInOneBlock,
                subnet_constructor=subnet_constructor,
                affine_clamping=config.flow.clamp,
                permute_soft=False,
            )

    def subnets(self) -> list[MoLEContextSubnet]:
        """All coupling subnets, in flow order."""
        return [m for m in self.inn.modules() if isinstance(m, MoLEContextSubnet)]

    def lora_layers(self) -> list[LoRALinear]:
        """Every expert-carrying linear of the flow."""
        return [layer for subnet in self.subnets() for layer in subnet.lora_layers()]

    def context_parameters(self) -> list[nn.Parameter]:
        """Shared context-branch parameters of all subnets."""
        return [p for subnet in self.subnets() for p in subnet.context_parameters()]

    def base_parameters(self) -> list[nn.Parameter]:
        """Shared flow parameters that are neither expert weights nor context branch."""
        excluded = {id(p) for layer in self.lora_layers() for key in layer.lora_A for p in layer.adapter_parameters(key)}
        excluded |= {id(p) for layer in self.lora_layers() for p in layer.task_bias.values()}
        excluded |= {id(p) for p in self.context_parameters()}
        # AllInOneBlock keeps its fixed permutation matrices as non-trainable parameters.
        return [p for name, p in self.named_parameters() if id(p) not in excluded and "w_perm" not in name]

    def set_adapter(self, key: str | None) -> None:
        """Activate expert ``key`` in every subnet linear."""
        for layer in self.lora_layers():
            layer.set_adapter(key)

    def add_adapter(self, key: str, lora: bool | None = None) -> None:
        """Add expert ``key`` (zero-initialised B and bias) to every subnet linear."""
        for layer in self.lora_layers():
            layer.add_adapter(key, lora=lora)

    def adapter_parameters(self, key: str) -> list[nn.Parameter]:
        """Parameters of expert ``key`` across the flow."""
        return [p for layer in self.lora_layers() for p in layer.adapter_parameters(key)]

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``(B, H, W, C)`` features to latents; returns ``(z, log_jac_det)`` with
        ``log_jac_det`` of shape ``(B, H, W)`` (+J forward, -J in reverse)."""
        batch, height, width, channels = x.shape
        for subnet in self.subnets():
            subnet.grid_size = (height, width)
        z, log_jac_det = self.inn(x.reshape(-1, channels), rev=rev)
        return z.reshape(batch, height, width, channels), log_jac_det.reshape(batch, height, width)
