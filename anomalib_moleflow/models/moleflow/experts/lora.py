"""LoRA-capable linear layer with one expert per task (peft-style).

Each task key owns a low-rank pair ``(A, B)`` and an optional bias. ``B`` starts at zero,
so a freshly added expert leaves the layer's output unchanged until it is trained.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``y = W x + b + scaling * B_t A_t x + bias_t`` for the active task ``t``.

    Args:
        in_features: Input width.
        out_features: Output width.
        rank: LoRA rank.
        alpha: LoRA alpha; scaling is ``alpha / rank`` (v2+) or ``alpha / (2 rank)`` (v1).
        scaling_rule: ``"alpha/rank"`` or ``"alpha/(2*rank)"``.
        use_lora: Whether task experts carry a low-rank pair.
        use_task_bias: Whether task experts carry an additive bias.
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
    ) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.rank = rank
        self.scaling = alpha / rank if scaling_rule == "alpha/rank" else alpha / (2 * rank)
        self.use_lora = use_lora
        self.use_task_bias = use_task_bias
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.task_bias = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None
        """Per-image weights ``(B, out, in)`` and biases ``(B, out)`` while a stacked pass routes each
        image's patches (rows ``B * N``, image-major) through its own expert; ``None`` otherwise."""
        self._merged: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, key: str, lora: bool | None = None) -> None:
        """Create the expert ``key``: A Kaiming-uniform, B and bias zero (identity start)."""
        if key in self.lora_A or key in self.task_bias:
            msg = f"LoRA adapter {key!r} already exists"
            raise ValueError(msg)
        if self.use_lora if lora is None else lora:
            lora_a = nn.Linear(self.in_features, self.rank, bias=False)
            lora_b = nn.Linear(self.rank, self.out_features, bias=False)
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
            self.lora_A[key] = lora_a.to(self.base.weight)
            self.lora_B[key] = lora_b.to(self.base.weight)
        if self.use_task_bias:
            self.task_bias[key] = nn.Parameter(torch.zeros_like(self.base.bias))

    def set_adapter(self, key: str | None) -> None:
        """Route through expert ``key`` (``None``: base layer only)."""
        self.active_adapter = key

    def adapter_parameters(self, key: str) -> list[nn.Parameter]:
        """Parameters owned by expert ``key``."""
        params: list[nn.Parameter] = []
        if key in self.lora_A:
            params += [self.lora_A[key].weight, self.lora_B[key].weight]
        if key in self.task_bias:
            params.append(self.task_bias[key])
        return params

    def merged_weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W + scaling * B A, b + bias_t)`` of expert ``key``, cached until a parameter changes.

        Used when no gradient is needed (inference): one matrix product per patch instead of three.
        """
        tensors = [self.base.weight, self.base.bias]
        if key in self.lora_A:
            tensors += [self.lora_A[key].weight, self.lora_B[key].weight]
        if key in self.task_bias:
            tensors.append(self.task_bias[key])
        stamp = (key, *((t.data_ptr(), t._version) for t in tensors))
        if self._merged is None or self._merged[0] != stamp:
            with torch.no_grad():
                weight, bias = self.base.weight.clone(), self.base.bias.clone()
                if key in self.lora_A:
                    weight += self.scaling * (self.lora_B[key].weight @ self.lora_A[key].weight)
                if key in self.task_bias:
                    bias += self.task_bias[key]
            self._merged = (stamp, weight, bias)
        return self._merged[1], self._merged[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the base layer plus the active expert's low-rank update and bias (or each image's
        own merged expert while :attr:`routed` is set)."""
        routed = getattr(self, "routed", None)  # absent from models pickled before it existed
        if routed is not None:
            weight, bias = routed
            rows = x.reshape(weight.shape[0], -1, x.shape[-1])
            return torch.baddbmm(bias[:, None], rows, weight.transpose(1, 2)).reshape(-1, weight.shape[1])
        key = self.active_adapter
        if key is not None and not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            weight, bias = self.merged_weights(key)
            return nn.functional.linear(x, weight, bias)
        y = self.base(x)
        key = self.active_adapter
        if key is not None:
            if key in self.lora_A:
                y = y + self.scaling * self.lora_B[key](self.lora_A[key](x))
            if key in self.task_bias:
                y = y + self.task_bias[key]
        return y
