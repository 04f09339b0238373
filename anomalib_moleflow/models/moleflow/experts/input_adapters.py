"""Per-task input adapters placed before the flow.

* :class:`WhiteningAdapter` (notes V3-1, default): LayerNorm without affine, then
  ``gamma * x + beta`` with ``gamma`` in ``[gamma_min, gamma_max]`` via sigmoid and
  ``beta`` in ``[-beta_max, beta_max]`` via tanh; task 0 starts at ``gamma ~ 1``.
* :class:`FiLMAdapter` (notes v3): LayerNorm (``use_norm``), a later task's mapping onto task 0's
  reference mean and std, FiLM, gated residual MLP; task 0 mixes 90 % identity with 10 %
  transformed features.
* :class:`InstanceNormMLPAdapter` (notes v1/v2): InstanceNorm over the patch grid, then a
  zero-initialised residual MLP behind a gate that starts at 0; tasks 1+ only (task 0 has none).
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
    """v3 FiLM input adapter on ``(B, H, W, C)``: LayerNorm, reference mapping, FiLM, gated residual MLP.

    As the notes' v3 ``TaskInputAdapter(channels, reference_mean, reference_std, use_norm)``:
    ``film_gamma = 1`` and ``film_beta = 0`` (identity FiLM), an MLP ``channels -> max(channels // 2,
    128) -> channels`` behind a residual gate that starts at 0.5, a LayerNorm when ``use_norm``, and
    an adapter without reference statistics (``has_reference=False``, task 0) returns 90 % identity
    plus 10 % transformed features.

    The notes leave open what the reference does inside ``forward`` and how the MLP starts; this
    package's choices: the reference is the per-channel mean and standard deviation of task 0's
    training patches (:meth:`fit_input_statistics`), and an adapter with a reference maps its
    normalised features onto it (``LN(x) * reference_std + reference_mean``) before FiLM, so a later
    task's features reach the shared flow at the scale task 0 trained it on. Without ``use_norm``
    there is nothing normalised to map, so the reference only switches the identity blend off. The
    MLP's output layer starts at zero and its activation is GELU, so a fresh adapter is FiLM of the
    (mapped) normalised features; without ``use_norm`` a fresh adapter is exactly the identity.

    Args:
        channels: Patch feature channels.
        task_index: Position of the task; task 0 never has a reference.
        use_norm: The notes' ``use_norm``: LayerNorm the features first.
        reference: ``(mean, std)`` of ``channels`` each, for a later task; ``None``: no reference
            (a later task without one is the 90 % identity blend as well, as in the notes).
    """

    def __init__(
        self,
        channels: int,
        task_index: int = 0,
        use_norm: bool = True,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        hidden = max(channels // 2, 128)
        self.use_norm = use_norm
        if use_norm:
            self.layer_norm = nn.LayerNorm(channels)
        self.film_gamma = nn.Parameter(torch.ones(channels))
        self.film_beta = nn.Parameter(torch.zeros(channels))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.residual_gate = nn.Parameter(torch.tensor([0.5]))
        if task_index == 0 and reference is not None:
            msg = "FiLMAdapter: task 0 has no reference statistics (it is the reference)"
            raise ValueError(msg)
        self.has_reference = reference is not None
        mean, std = reference if reference is not None else (torch.zeros(channels), torch.ones(channels))
        if mean.shape != (channels,) or std.shape != (channels,):
            msg = f"FiLMAdapter reference mean and std must have shape ({channels},), got {tuple(mean.shape)} and {tuple(std.shape)}"
            raise ValueError(msg)
        self.register_buffer("reference_mean", mean.detach().clone().float())
        self.register_buffer("reference_std", std.detach().clone().float())
        self.register_buffer("input_mean", torch.zeros(channels))
        """Per-channel mean of this task's training patches (the reference of later tasks)."""
        self.register_buffer("input_std", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FiLM-modulated, MLP-refined features; without a reference 90 % identity."""
        y = x
        if getattr(self, "use_norm", True):  # absent from adapters pickled before it existed
            y = self.layer_norm(x)
            if self.has_reference and hasattr(self, "reference_std"):
                y = y * self.reference_std + self.reference_mean
        y = self.film_gamma * y + self.film_beta
        y = y + self.residual_gate * self.mlp(y)
        if not self.has_reference:
            y = 0.9 * x + 0.1 * y
        return y

    @torch.no_grad()
    def fit_input_statistics(self, chunks: list[torch.Tensor], eps: float = 1e-6) -> None:
        """Per-channel mean and standard deviation of this task's training patches (chunks of
        ``(b, H, W, C)`` patch features, as the adapter receives them)."""
        flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_((flat.var(0, unbiased=False) + eps).sqrt())

    def regularization(self) -> torch.Tensor:
        """No regulariser for the FiLM adapter."""
        return self.film_gamma.new_zeros(())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Checkpoints written before the reference statistics load with none: mean 0, std 1."""
        for name, fill in (("reference_mean", 0.0), ("reference_std", 1.0), ("input_mean", 0.0), ("input_std", 1.0)):
            state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), fill))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each channel of each image over its patch grid: ``(B, H, W, C)`` in and out."""
    mean = x.mean(dim=(1, 2), keepdim=True)
    var = x.var(dim=(1, 2), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class InstanceNormMLPAdapter(nn.Module):
    """v1/v2 input adapter: ``y = IN(x) + gate * MLP(IN(x))`` on ``(B, H, W, C)``.

    ``IN`` is an instance norm without affine parameters: each channel of each image is
    normalised over the patch grid (v3 replaced it by a per-patch LayerNorm "to preserve
    spatial info"). The MLP is ``channels -> channels // 4 -> channels`` (the width v3 says it
    grew from) with GELU, its output layer zero-initialised, and the gate starts at 0 as the notes
    write it. The notes leave open how the MLP's activation and norm epsilon are chosen; GELU (as the
    v3 adapter here) and ``1e-5`` are this package's choice.

    With both the output layer and the gate at zero neither receives a gradient, so the adapter
    stays the instance norm while training: the notes' "residual gate starts at 0, so it is barely
    used", reproduced as written. The adapter exists for tasks 1+ only: the factory gives task 0 none.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        hidden = max(channels // 4, 1)
        self.eps = eps
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.residual_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Instance-normalised features plus the gated MLP refinement."""
        normed = instance_norm(x, self.eps)
        return normed + self.residual_gate * self.mlp(normed)

    def regularization(self) -> torch.Tensor:
        """No regulariser for the v1/v2 adapter."""
        return self.residual_gate.new_zeros(())


def build_input_adapter(
    config: ExpertConfig,
    channels: int,
    task_index: int,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module | None:
    """Factory for the configured adapter kind (``None`` for ``"none"``, and for task 0 with
    ``"instance_norm_mlp"``: in v1/v2 only later tasks have an adapter). ``reference``: task 0's
    patch mean and std, given to a later task's FiLM adapter (ignored by the other kinds)."""
    if config.input_adapter == "whitening":
        return WhiteningAdapter(
            channels,
            task_index,
            gamma_range=config.whitening_gamma_range,
            beta_max=config.whitening_beta_max,
            identity_reg=config.whitening_identity_reg,
        )
    if config.input_adapter == "film":
        return FiLMAdapter(channels, task_index, use_norm=config.film_use_norm, reference=reference if task_index > 0 else None)
    if config.input_adapter == "instance_norm_mlp":
        return InstanceNormMLPAdapter(channels) if task_index > 0 else None
    return None
