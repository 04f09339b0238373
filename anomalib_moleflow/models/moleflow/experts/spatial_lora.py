"""Spatial-Contextual LoRA (SC-LoRA, notes v4): a LoRA expert whose low-rank pair depends on where
the patch lies in the image.

Each task owns a ``G x G`` grid of low-rank pairs, ``A: (G, G, rank, in)`` and ``B: (G, G, out,
rank)``. A patch's pair is the bilinear interpolation of the grid at its position, and the layer
adds ``scaling * B(p) A(p) x`` to the shared base, as :class:`~.lora.LoRALinear` adds ``scaling * B
A x``. Every cell of ``B`` starts at zero, so a fresh expert is the identity update.

Choices the notes leave open, made here:

* Grid cell ``(a, b)`` sits at the centre of the ``a``-th / ``b``-th of ``G`` equal bands of the
  patch grid (``align_corners=False`` in ``F.interpolate`` terms); a patch between cell centres
  mixes the (up to) four nearest cells, a patch beyond the outermost centres takes the edge value.
  With ``G = 1`` the layer is a standard LoRA.
* ``A`` and ``B`` are interpolated separately (the notes' ``_get_interpolated_lora``), so the
  update is ``B(p) A(p)``, not an interpolation of the cells' products.
* Every cell of ``A`` gets its own Kaiming-uniform draw (as ``nn.Linear``), so cells differ from
  the first step on; the per-task bias stays position-independent, as in :class:`~.lora.LoRALinear`.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRALinear

__all__ = ["SpatialLoRALinear", "bilinear_grid_weights"]


def _axis_weights(n: int, g: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n, g)`` linear-interpolation weights of ``n`` patch centres over ``g`` cell centres."""
    if g == 1:
        return torch.ones(n, 1, device=device, dtype=dtype)
    coord = ((torch.arange(n, device=device, dtype=dtype) + 0.5) * (g / n) - 0.5).clamp(0, g - 1)
    cells = torch.arange(g, device=device, dtype=dtype)
    return (1 - (coord[:, None] - cells[None]).abs()).clamp_min(0)  # the hat function of each cell


def bilinear_grid_weights(height: int, width: int, grid: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(height * width, grid * grid)`` bilinear weights of each patch (row-major) over the cells
    of a ``grid x grid`` parameter grid (row-major); each row sums to 1."""
    rows = _axis_weights(height, grid, device, dtype)
    cols = _axis_weights(width, grid, device, dtype)
    return torch.einsum("ia,jb->ijab", rows, cols).reshape(height * width, grid * grid)


class SpatialLoRALinear(LoRALinear):
    """``y = W x + b + scaling * B_t(p) A_t(p) x + bias_t`` for the active task ``t`` and patch position ``p``.

    Inputs are the flow's patch rows ``(B * H * W, in)``, image-major and row-major over the patch
    grid; :attr:`patch_grid` ``(H, W)`` must be set before a forward with an active LoRA expert
    (the coupling subnet sets it). A forward interpolates one pair per patch position
    (``H * W * rank * (in + out)`` values, whatever the batch size) and applies it to every image.

    Args:
        in_features: Input width.
        out_features: Output width.
        rank: LoRA rank.
        alpha: LoRA alpha; scaling as :class:`~.lora.LoRALinear`.
        scaling_rule: ``"alpha/rank"`` or ``"alpha/(2*rank)"``.
        use_lora: Whether task experts carry a grid of low-rank pairs.
        use_task_bias: Whether task experts carry an additive bias.
        grid_size: Cells per side of the parameter grid ``G`` (>= 1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 16,
        alpha: float = 1.0,
        scaling_rule: str = "alpha/rank",
        use_lora: bool = True,
        use_task_bias: bool = True,
        grid_size: int = 4,
    ) -> None:
        if int(grid_size) < 1:
            msg = f"SpatialLoRALinear grid_size must be >= 1, got {grid_size!r}"
            raise ValueError(msg)
        super().__init__(in_features, out_features, rank, alpha, scaling_rule, use_lora, use_task_bias)
        self.grid_size = int(grid_size)
        self.lora_A = nn.ParameterDict()  # key -> (G, G, rank, in)
        self.lora_B = nn.ParameterDict()  # key -> (G, G, out, rank)
        self.patch_grid: tuple[int, int] | None = None
        """``(H, W)`` of the patch grid the rows come from."""

    def add_adapter(self, key: str, lora: bool | None = None) -> None:
        """Create expert ``key``: each cell of A Kaiming-uniform, every cell of B and the bias zero."""
        if key in self.lora_A or key in self.task_bias:
            msg = f"LoRA adapter {key!r} already exists"
            raise ValueError(msg)
        g, weight = self.grid_size, self.base.weight
        if self.use_lora if lora is None else lora:
            lora_a = torch.empty(g * g * self.rank, self.in_features, device=weight.device, dtype=weight.dtype)
            nn.init.kaiming_uniform_(lora_a, a=5**0.5)  # fan-in = in_features, as nn.Linear(in, rank)
            self.lora_A[key] = nn.Parameter(lora_a.view(g, g, self.rank, self.in_features))
            self.lora_B[key] = nn.Parameter(torch.zeros(g, g, self.out_features, self.rank, device=weight.device, dtype=weight.dtype))
        if self.use_task_bias:
            self.task_bias[key] = nn.Parameter(torch.zeros_like(self.base.bias))

    def adapter_parameters(self, key: str) -> list[nn.Parameter]:
        """Parameters owned by expert ``key``: its A and B grids and its bias."""
        params: list[nn.Parameter] = []
        if key in self.lora_A:
            params += [self.lora_A[key], self.lora_B[key]]
        if key in self.task_bias:
            params.append(self.task_bias[key])
        return params

    def merged_weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Not defined: the update differs per patch position, so no single matrix holds it."""
        msg = "SpatialLoRALinear has no merged weight: its LoRA update varies with the patch position"
        raise TypeError(msg)

    def grid_weights(self, like: torch.Tensor) -> torch.Tensor:
        """Bilinear weights ``(H * W, G * G)`` of the current :attr:`patch_grid`."""
        if self.patch_grid is None:
            msg = "SpatialLoRALinear.patch_grid must be set to the (H, W) patch grid before a forward"
            raise RuntimeError(msg)
        height, width = self.patch_grid
        return bilinear_grid_weights(height, width, self.grid_size, like.device, like.dtype)

    def _spatial_update(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """``B(p) A(p) x`` for rows ``x (B * H * W, in)`` with one expert's grids: the grids are
        interpolated to one pair per position once, then applied to every image."""
        weights = self.grid_weights(x)
        positions = weights.shape[0]
        a_map = (weights @ lora_a.reshape(-1, self.rank * self.in_features)).view(positions, self.rank, self.in_features)
        b_map = (weights @ lora_b.reshape(-1, self.out_features * self.rank)).view(positions, self.out_features, self.rank)
        rows = x.reshape(-1, positions, self.in_features)
        low = torch.einsum("bpi,pri->bpr", rows, a_map)
        return torch.einsum("bpr,por->bpo", low, b_map).reshape(-1, self.out_features)

    def _routed_forward(self, x: torch.Tensor, routed: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Each image through its own expert: ``routed = (weight (B, out, in), bias (B, out),
        A (B, G, G, rank, in), B (B, G, G, out, rank))``, ``weight`` / ``bias`` the base plus the
        task bias. Interpolates the projections rather than the grids (no ``(B, H*W, rank, in)``
        tensor): ``A(p) x = sum_g w_g(p) A_g x`` and ``B(p) u = sum_g B_g (w_g(p) u)``."""
        weight, bias, lora_a, lora_b = routed
        batch, cells = weight.shape[0], self.grid_size**2
        rows = x.reshape(batch, -1, self.in_features)
        y = torch.baddbmm(bias[:, None], rows, weight.transpose(1, 2))
        weights = self.grid_weights(x)  # (P, G*G)
        projected = torch.bmm(rows, lora_a.reshape(batch, cells * self.rank, self.in_features).transpose(1, 2))
        low = (projected.view(batch, -1, cells, self.rank) * weights[None, :, :, None]).sum(dim=2)  # (B, P, rank)
        spread = (low[:, :, None, :] * weights[None, :, :, None]).reshape(batch, -1, cells * self.rank)
        b_stack = lora_b.permute(0, 1, 2, 4, 3).reshape(batch, cells * self.rank, self.out_features)
        y = y + self.scaling * torch.bmm(spread, b_stack)
        return y.reshape(-1, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base layer plus the active expert's position-dependent update and bias (or each image's
        own expert while :attr:`routed` is set)."""
        if self.routed is not None:
            return self._routed_forward(x, self.routed)
        y = self.base(x)
        key = self.active_adapter
        if key is not None:
            if key in self.lora_A:
                y = y + self.scaling * self._spatial_update(x, self.lora_A[key], self.lora_B[key])
            if key in self.task_bias:
                y = y + self.task_bias[key]
        return y

    def extra_repr(self) -> str:
        """Widths, rank and grid size."""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, grid_size={self.grid_size}"
