"""The lower-case v4.1 context extractor: a fixed neighbourhood mean, with no trainable parameter.

v4 learned its context extractor on task 0 only, which biased the context toward task 0; v4.1
fixed it to ``context = (1 - gate) * x + gate * neighbour_mean`` with the gate fixed at 0.3 and the
neighbour mean a depthwise ``k x k`` average, so the context means the same for every task.

Here it replaces the learned depthwise conv of each coupling subnet's context branch
(``flow.use_neighborhood_context``; :class:`~.shared_flow.SharedFlow` puts it there), which is where
the notes' cross-patch coupling layer conditions its scale on the context. The branch's bounded
scale (``flow.context_init_scale`` / ``flow.context_max_alpha``) or patch gate stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class NeighborhoodContextExtractor(nn.Module):
    """``(1 - gate) * x + gate * mean_k(x)`` on channels-first ``(N, C, H, W)`` maps, the layout of
    the depthwise conv it stands in for.

    The mean is the notes' depthwise ``k x k`` kernel of ``1 / k^2`` with zero padding (the notes'
    ``F.conv2d(x, avg_kernel, padding, groups=D)``), so a border patch averages in zeros for the
    neighbours it lacks; computed as an average pool, which is the same operation.

    Args:
        kernel_size: Odd neighbourhood size ``k``.
        gate: Fixed weight of the neighbour mean, in ``[0, 1]`` (notes: 0.3).
    """

    def __init__(self, kernel_size: int = 3, gate: float = 0.3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            msg = f"NeighborhoodContextExtractor kernel_size must be odd and >= 1, got {kernel_size}"
            raise ValueError(msg)
        if not 0.0 <= gate <= 1.0:
            msg = f"NeighborhoodContextExtractor gate must be in [0, 1], got {gate}"
            raise ValueError(msg)
        self.kernel_size = kernel_size
        self.gate = float(gate)

    def neighbor_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of each patch's ``k x k`` neighbourhood (zeros beyond the border), ``(N, C, H, W)``."""
        k = self.kernel_size
        return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed blend of each patch with its neighbourhood mean."""
        return (1.0 - self.gate) * x + self.gate * self.neighbor_mean(x)

    def extra_repr(self) -> str:
        """Kernel size and gate."""
        return f"kernel_size={self.kernel_size}, gate={self.gate}"
