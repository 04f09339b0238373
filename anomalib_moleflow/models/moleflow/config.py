"""One configuration object for MoLE-Flow.

Every switch of the design notes (v1 .. V4.1, plus the failed experiments) is a field
here, so that each version is a configuration rather than a code branch. The defaults
are the final V4.1 design ("true complete separation").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

InputAdapterKind = Literal["whitening", "film", "none"]
LoRAScaling = Literal["alpha/rank", "alpha/(2*rank)"]


@dataclass
class MoLEFlowConfig:
    """All hyper-parameters of the MoLE-Flow torch model, loss and scorer.

    Field names follow the design notes (``seed-update-notes``) so a reader can find
    each switch there.
    """

    # --- backbone and patch features -------------------------------------------------
    backbone: str = "tf_efficientnet_lite0"
    """timm name; offline weights exist for ``tf_efficientnet_lite{0,1,2}`` and
    ``vit_small_patch14_dinov2`` (see :mod:`anomalib_moleflow.backbones`)."""
    layers: tuple[int, ...] = (2, 3)
    """timm ``out_indices``: for EfficientNet-Lite 2 and 3 are the stride-8 and stride-16 stages."""
    pre_trained: bool = True
    image_size: int = 256
    feature_aggregation_kernel: int = 3
    """PatchCore-style local aggregation (average over k x k neighbourhoods), 1 disables."""
    feature_dim: int | None = None
    """If set, each layer is pooled to this many channels and the layers are averaged
    (public MoLE-Flow: 768); ``None`` concatenates the native channels."""
    use_position_embedding: bool = True
    grid_downsample: int = 2
    """Average-pool the patch grid by this factor after aggregation: 2 gives a 16x16 grid at 256 px,
    four times fewer patches for the flow (latency), and measured at least as good as the 32x32 grid
    in the continual run (benchmarks/tuning/README.md); 1 is the notes' stride-8 grid."""

    # --- input adapter (per task) -----------------------------------------------------
    input_adapter: InputAdapterKind = "whitening"
    """``whitening`` (V3-1, default), ``film`` (v3 FiLM adapter) or ``none`` (v1/v2)."""
    whitening_gamma_range: tuple[float, float] = (0.5, 2.0)
    whitening_beta_max: float = 2.0
    whitening_identity_reg: float = 0.1
    """Task 0 pull toward gamma=1, beta=0 (V3-1)."""

    # --- shared spatial mixer (trained on task 0 only) --------------------------------
    use_spatial_mixer: bool = True
    spatial_mixer_kernel: int = 3

    # --- multi-scale context (V3-2, conflicts with whitening) -------------------------
    use_ms_context: bool = False
    ms_context_dilations: tuple[int, ...] = (1, 2, 4)

    # --- base coupling flow -----------------------------------------------------------
    n_coupling_blocks: int = 8
    """Public code: 6. Here 8 measured better on transistor (pixel AUROC 0.949 vs 0.937,
    benchmarks/tuning/README.md)."""
    clamp: float = 1.9
    subnet_hidden_ratio: float = 2.0
    """Hidden width of the coupling subnets relative to the split width."""
    use_context: bool = True
    """Context branch inside each subnet: depthwise conv over the patch grid (V4.1)."""
    context_kernel: int = 5
    """Public code: 5; the notes' ``scale_context_kernel``: 3. With 3, bottle's flow-only pixel AUROC
    rose (0.970 -> 0.975) but transistor's image AUROC fell in the full continual run (0.992 -> 0.988,
    benchmarks/tuning/README.md), so 5 stays."""
    context_init_scale: float = 0.1
    context_max_alpha: float = 0.2
    use_context_gate: bool = False
    """Baseline 2.0 patch-wise gate instead of the global alpha."""
    context_gate_hidden: int = 64

    # --- per-task experts -------------------------------------------------------------
    use_lora: bool = True
    lora_rank: int = 32
    """Public code: 64 (16-128 made no difference there). Here rank 32 with a 3-block DIA raised
    transistor-after-bottle image AUROC 0.956 -> 0.973 over rank 16 with 2 blocks."""
    lora_alpha: float = 1.0
    lora_scaling: LoRAScaling = "alpha/rank"
    """v1 used ``alpha/(2*rank)``; v2 onward ``alpha/rank``."""
    lora_on_task0: bool = True
    """v2 onward: task 0 has its own LoRA expert too (v1: base only)."""
    use_task_bias: bool = True
    use_dia: bool = True
    dia_n_blocks: int = 3
    dia_hidden_ratio: float = 1.0
    dia_clamp: float = 1.9

    # --- what trains when -------------------------------------------------------------
    freeze_base_after_task0: bool = True
    """Base flow trains on task 0 only (every version); ``False`` is the sequential
    fine-tuning baseline the public code reports as collapsing."""
    freeze_mixer_after_task0: bool = True
    """V4: spatial mixer / MS context frozen after task 0 (V3 trained them on every task)."""
    freeze_context_after_task0: bool = True
    """V4.1: context convs and their scales frozen after task 0 (V4 kept training them)."""

    # --- loss -------------------------------------------------------------------------
    tail_weight: float = 1.0
    """Weight of the tail-aware term; the mean term gets ``1 - tail_weight``. Public code: 0.7,
    with 1.0 giving its best pixel AP; here 1.0 gave transistor pixel AUROC 0.951 vs 0.937."""
    tail_top_ratio: float = 0.02
    logdet_reg: float = 1e-4
    center_loss_weight: float = 0.0
    """v5 centre loss on the latent (failed experiment)."""
    focal_gamma: float = 0.0
    """v7 focal NLL (failed experiment)."""

    # --- routing (task id unknown at test time) ----------------------------------------
    router: Literal["prototype", "hybrid", "none"] = "prototype"
    """``prototype``: Mahalanobis-nearest task mean of pooled features (public code);
    ``hybrid``: notes V3-5 two-stage (prototype top-k, then flow likelihood)."""
    router_top_k: int = 2
    unknown_threshold: float | None = None
    """Flag "unknown product" when the nearest prototype is farther than this multiple of
    the task's calibrated (99th-percentile) training distance; ``None`` = off."""

    # --- scoring ----------------------------------------------------------------------
    score_top_k: int = 3
    global_score_weight: float = 0.5
    global_score_layers: tuple[int, ...] = (4,)
    """timm ``out_indices`` whose globally pooled maps feed the global score (and the router):
    for EfficientNet-Lite 4 is the last, stride-32 stage (320 channels). Its Mahalanobis score
    alone reached transistor image AUROC 0.973 where the pooled patch features reached 0.941.
    Empty: pool the patch features instead."""
    """Beyond the notes: image score = z(flow top-k) + weight * z(Mahalanobis distance of the
    globally pooled features to the task's Gaussian), both z-normalised on the task's training
    images (:mod:`.global_score`); 0 keeps the notes' flow-only image score. With 0.5 and the
    stride-32 stage, transistor-after-bottle image AUROC rose from 0.968 to 0.993 (post-hoc,
    benchmarks/tuning/README.md)."""
    position_gaussian_weight: float = 1.0
    """Beyond the notes: the anomaly map scores each patch by the flow NLL plus this weight times
    the patch's NLL under the task's position-conditional Gaussian (per-position mean, one shared
    shrunk covariance; :mod:`.position_gaussian`); the image score stays on the flow NLL. 0 keeps
    the notes' flow-only map. Continual bottle -> transistor pixel AUROC 0.9700 / 0.9742 -> 0.9736 /
    0.9810 (benchmarks/results/continual_real.md; post-hoc figures in benchmarks/tuning/README.md)."""
    position_gaussian_shrinkage: float = 0.1
    """Added to the Gaussian's covariance diagonal, as a fraction of its mean variance."""
    anomaly_map_sigma: float = 4.0

    # --- optimisation -----------------------------------------------------------------
    lr: float = 2e-3
    """Measured on transistor (8 epochs): 3e-4 gave image AUROC 0.76, 1e-3 0.94, 2e-3 0.97; the public
    code uses 3e-4 over 60 epochs, which the 2-core CPU budget here does not allow."""
    weight_decay: float = 1e-5
    grad_clip: float = 0.5
    warmup_epochs: int = 0
    cache_features: bool = True
    """Cache frozen-backbone features of training images so each is seen once per task."""

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        self.whitening_gamma_range = tuple(float(v) for v in self.whitening_gamma_range)  # type: ignore[assignment]
        self.ms_context_dilations = tuple(int(d) for d in self.ms_context_dilations)
        self.global_score_layers = tuple(int(i) for i in self.global_score_layers)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        positive = {
            "image_size": self.image_size,
            "n_coupling_blocks": self.n_coupling_blocks,
            "lora_rank": self.lora_rank,
            "dia_n_blocks": self.dia_n_blocks,
            "score_top_k": self.score_top_k,
            "feature_aggregation_kernel": self.feature_aggregation_kernel,
            "grid_downsample": self.grid_downsample,
            "context_kernel": self.context_kernel,
            "spatial_mixer_kernel": self.spatial_mixer_kernel,
        }
        for name, value in positive.items():
            if value < 1:
                msg = f"MoLEFlowConfig.{name} must be >= 1, got {value}"
                raise ValueError(msg)
        for name in ("feature_aggregation_kernel", "context_kernel", "spatial_mixer_kernel"):
            if getattr(self, name) % 2 == 0:
                msg = f"MoLEFlowConfig.{name} must be odd, got {getattr(self, name)}"
                raise ValueError(msg)
        if not self.layers:
            msg = "MoLEFlowConfig.layers must name at least one backbone stage"
            raise ValueError(msg)
        low, high = self.whitening_gamma_range
        if not 0 < low < 1 < high:
            msg = f"MoLEFlowConfig.whitening_gamma_range must satisfy 0 < low < 1 < high, got {(low, high)}"
            raise ValueError(msg)
        if self.position_gaussian_weight < 0:
            msg = f"MoLEFlowConfig.position_gaussian_weight must be >= 0, got {self.position_gaussian_weight}"
            raise ValueError(msg)
        if self.position_gaussian_shrinkage < 0:
            msg = f"MoLEFlowConfig.position_gaussian_shrinkage must be >= 0, got {self.position_gaussian_shrinkage}"
            raise ValueError(msg)
        if self.global_score_weight < 0:
            msg = f"MoLEFlowConfig.global_score_weight must be >= 0, got {self.global_score_weight}"
            raise ValueError(msg)
        if not 0.0 <= self.tail_weight <= 1.0:
            msg = f"MoLEFlowConfig.tail_weight must be in [0, 1], got {self.tail_weight}"
            raise ValueError(msg)
        if not 0.0 < self.tail_top_ratio <= 1.0:
            msg = f"MoLEFlowConfig.tail_top_ratio must be in (0, 1], got {self.tail_top_ratio}"
            raise ValueError(msg)
        if self.input_adapter not in ("whitening", "film", "none"):
            msg = f"MoLEFlowConfig.input_adapter must be 'whitening', 'film' or 'none', got {self.input_adapter!r}"
            raise ValueError(msg)
        if self.router not in ("prototype", "hybrid", "none"):
            msg = f"MoLEFlowConfig.router must be 'prototype', 'hybrid' or 'none', got {self.router!r}"
            raise ValueError(msg)
        if self.lora_scaling not in ("alpha/rank", "alpha/(2*rank)"):
            msg = f"MoLEFlowConfig.lora_scaling must be 'alpha/rank' or 'alpha/(2*rank)', got {self.lora_scaling!r}"
            raise ValueError(msg)

    @property
    def effective_ms_context(self) -> bool:
        """V3-2: whitening + multi-scale context collapses training, so MS context is dropped."""
        return self.use_ms_context and self.input_adapter != "whitening"

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (tuples become lists) for checkpoints and JSON."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLEFlowConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"Unknown MoLEFlowConfig field(s): {', '.join(unknown)}"
            raise ValueError(msg)
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> MoLEFlowConfig:
        """Build from a config stored in a checkpoint: a field the checkpoint predates gets the
        value that reproduces how that model was trained and scored, not today's default."""
        return cls.from_dict({**_ABSENT_FROM_OLDER_CHECKPOINTS, **data})


_ABSENT_FROM_OLDER_CHECKPOINTS: dict[str, Any] = {
    "grid_downsample": 1,
    "global_score_weight": 0.0,
    "position_gaussian_weight": 0.0,
}
"""Fields added after the first checkpoints were written, with the behaviour those checkpoints had."""
