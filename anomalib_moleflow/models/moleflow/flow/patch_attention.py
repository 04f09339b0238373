"""v6 patch self-attention before the flow (a failed experiment of the notes: the backbone's
features already carry context, and the extra attention hurt).

:class:`LightweightPatchAttention` is shared by all tasks, like the base flow: it trains on task 0
and is frozen after (it belongs to the shared "mixer" group, ``flow.freeze_mixer_after_task0``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LightweightPatchAttention(nn.Module):
    """Single-head self-attention over all patches of an image, gated residual, then an FFN, both
    pre-LayerNorm, on ``(B, H, W, D)``::

        x = x + sigmoid(gate) * W_o softmax(Q K^T / sqrt(h)) V      (Q, K, V of LayerNorm(x))
        x = x + FFN(LayerNorm(x))

    The notes write ``gate = nn.Parameter(torch.zeros(1))`` read through a sigmoid, so the
    attention enters at weight 0.5 from the first step, although their prose says the module
    starts as the identity; this follows their code (as ``LightweightMSContext`` here does). The
    notes leave the FFN open: here ``D -> hidden -> D`` with GELU and dropout, its output layer
    zero-initialised so that it adds nothing at the start, and an output projection ``hidden -> D``
    brings the attended values back to the feature width (the notes add ``hidden``-wide values to
    ``D``-wide features, which needs one).

    Args:
        embed_dim: Feature width ``D``.
        hidden_dim: Width of queries, keys, values and the FFN (notes: 256).
        dropout: Dropout on the attention weights and in the FFN (notes: 0.1).
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if embed_dim < 1 or hidden_dim < 1:
            msg = f"LightweightPatchAttention needs embed_dim and hidden_dim >= 1, got {embed_dim} and {hidden_dim}"
            raise ValueError(msg)
        if not 0.0 <= dropout < 1.0:
            msg = f"LightweightPatchAttention dropout must be in [0, 1), got {dropout}"
            raise ValueError(msg)
        self.hidden_dim = hidden_dim
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.q_proj = nn.Linear(embed_dim, hidden_dim)
        self.k_proj = nn.Linear(embed_dim, hidden_dim)
        self.v_proj = nn.Linear(embed_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, embed_dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim)
        )
        nn.init.zeros_(self.ffn[-1].weight)
        nn.init.zeros_(self.ffn[-1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attended values ``W_o softmax(Q K^T / sqrt(h)) V`` of a patch sequence ``(B, N, D)``."""
        normed = self.attention_norm(x)
        q, k, v = self.q_proj(normed), self.k_proj(normed), self.v_proj(normed)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.hidden_dim), dim=-1)
        return self.out_proj(self.attention_dropout(weights) @ v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Context-enhanced features of the same shape ``(B, H, W, D)``."""
        batch, height, width, channels = x.shape
        seq = x.reshape(batch, height * width, channels)
        seq = seq + torch.sigmoid(self.gate) * self.attention(seq)
        seq = seq + self.ffn(self.ffn_norm(seq))
        return seq.reshape(batch, height, width, channels)
