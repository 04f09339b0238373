"""One configuration object for MoLE-Flow, in named groups.

Every switch of the design notes (v1 .. V4.1, plus the failed experiments) is a field, so that
each version is a configuration rather than a code branch; the defaults are the final V4.1 design
plus the measured changes listed in the model README. Field names are the notes' names; each
field belongs to one group:

=========== ================================================================================
group       fields
=========== ================================================================================
features    backbone, stages, input size, local aggregation, grid, position embedding, cache
flow        the shared coupling flow, its subnet context branch, the shared patch mixers, and
            which shared parts keep training after task 0
experts     what each task adds: input adapter, LoRA, task bias, DIA
loss        NLL, tail-aware term, regularisers, failed-experiment losses
routing     which expert scores an image when the task id is hidden
scoring     image score, global score, position Gaussian, anomaly-map smoothing
optim       optimiser and gradient clipping
=========== ================================================================================

On the command line a field is ``--model.config.<group>.<field>`` (e.g.
``--model.config.flow.n_coupling_blocks 6``); in YAML it sits under ``model.config.<group>``.
:meth:`MoLEFlowConfig.from_dict` also takes the flat field names that checkpoints written before
the groups hold (``{"lora_rank": 16}``), so every saved config still loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .training_stages import TRAINING_STAGES, TrainingStages

InputAdapterKind = Literal["whitening", "film", "instance_norm_mlp", "none"]
INPUT_ADAPTERS: tuple[str, ...] = ("whitening", "film", "instance_norm_mlp", "none")
MSContextKind = Literal["shared", "task_conditioned"]
LoRAScaling = Literal["alpha/rank", "alpha/(2*rank)"]
LoRAKind = Literal["standard", "spatial_contextual"]
RouterKind = Literal["memory", "prototype", "hybrid", "none"]
PrototypeMetric = Literal["auto", "mahalanobis", "euclidean"]
ImageScore = Literal["top_k_mean", "max", "p99"]
IMAGE_SCORES: tuple[str, ...] = ("top_k_mean", "max", "p99")


def _fail(name: str, requirement: str, value: object) -> None:
    msg = f"MoLEFlowConfig.{name} must {requirement}, got {value!r}"
    raise ValueError(msg)


def _at_least_one(group: str, obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            _fail(f"{group}.{name}", "be >= 1", getattr(obj, name))


def _odd(group: str, obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) % 2 == 0:
            _fail(f"{group}.{name}", "be odd", getattr(obj, name))


def _one_of(group: str, name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        _fail(f"{group}.{name}", f"be one of {', '.join(repr(a) for a in allowed)}", value)


@dataclass
class FeatureConfig:
    """Frozen backbone and patch features."""

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
    """Average-pool the patch grid by this factor after aggregation (2: a 16x16 grid at 256 px);
    1 is the notes' stride-8 grid."""
    cache_features: bool = True
    """Cache frozen-backbone features of training images so each goes through the backbone once per task."""

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        _at_least_one("features", self, ("image_size", "feature_aggregation_kernel", "grid_downsample"))
        _odd("features", self, ("feature_aggregation_kernel",))
        if not self.layers:
            _fail("features.layers", "name at least one backbone stage", self.layers)


@dataclass
class FlowConfig:
    """The shared coupling flow, its context branch, the shared patch mixers, and what trains after task 0."""

    n_coupling_blocks: int = 8
    clamp: float = 1.9
    subnet_hidden_ratio: float = 2.0
    """Hidden width of the coupling subnets relative to the split width."""
    use_context: bool = True
    """Context branch inside each coupling subnet: a depthwise conv over the patch grid, scaled by a
    bounded global alpha (Baseline 1.5) or a patch-wise gate (Baseline 2.0)."""
    context_kernel: int = 5
    """Public code: 5; the notes' ``scale_context_kernel``: 3."""
    context_init_scale: float = 0.1
    context_max_alpha: float = 0.2
    use_context_gate: bool = False
    """Baseline 2.0 patch-wise gate instead of the global alpha."""
    context_gate_hidden: int = 64
    use_cpcf: bool = False
    """Lower-case v4 Cross-Patch Coupling Flow: the context branch (``use_context``, its extractor
    sized by ``context_kernel``, the notes' ``--cpcf_context_kernel``) feeds both the scale and the
    translation branch of every coupling, unscaled (no alpha, no gate); see
    :mod:`~.flow.cross_patch_coupling`."""
    cpcf_use_attention: bool = False
    """CPCF's ``--cpcf_use_attention``: the context is a learned attention over each patch's
    ``context_kernel`` neighbourhood instead of the depthwise conv."""
    use_spatial_mixer: bool = True
    """Shared ``SpatialMixer`` before the flow (V3/V4)."""
    spatial_mixer_kernel: int = 3
    use_ms_context: bool = False
    """V3-2 ``LightweightMSContext`` before the flow (dropped together with the whitening adapter
    unless ``force_ms_context``)."""
    force_ms_context: bool = False
    """Keep the MS context with ``experts.input_adapter='whitening'`` instead of dropping it: the
    notes' "WhiteningAdapter + MS-Context Conflict", the combination of their "All V3 (conflict)"
    row (mean image 0.4471, training collapsed). Only for reproducing that row; requires
    ``use_ms_context`` and changes nothing with another input adapter (nothing is dropped then)."""
    ms_context_dilations: tuple[int, ...] = (1, 2, 4)
    ms_context_kind: MSContextKind = "shared"
    """``shared``: one ``LightweightMSContext`` for all tasks; ``task_conditioned``: V3's
    ``TaskConditionedMSContext`` (the notes' ``use_task_conditioned_ms_context``), shared dilated
    convs with each task's own conditioning of the context, an expert part."""
    use_neighborhood_context: bool = False
    """Lower-case v4.1: the subnets' context branch is the fixed neighbourhood mean
    ``(1 - g) x + g * mean_k(x)`` (no trainable parameter) instead of a learned depthwise conv."""
    neighborhood_gate: float = 0.3
    """v4.1's fixed gate ``g`` of the neighbourhood mean."""
    neighborhood_kernel: int = 3
    """v4.1's neighbourhood size ``k`` (odd)."""
    use_patch_attention: bool = False
    """v6 ``LightweightPatchAttention`` before the flow: shared, in the mixer group (trained on task 0,
    frozen after with ``freeze_mixer_after_task0``)."""
    patch_attention_hidden: int = 256
    patch_attention_dropout: float = 0.1
    freeze_base_after_task0: bool = True
    """The coupling blocks train on task 0 only (every version); ``False`` is the sequential
    fine-tuning baseline the public code reports as collapsing."""
    freeze_mixer_after_task0: bool = True
    """V4: spatial mixer / MS context (its shared convs) / patch attention frozen after task 0 (V3
    trained them on every task)."""
    freeze_context_after_task0: bool = True
    """V4.1: the subnets' context convs and alphas frozen after task 0 (V4 kept training them)."""

    def __post_init__(self) -> None:
        self.ms_context_dilations = tuple(int(d) for d in self.ms_context_dilations)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        _at_least_one("flow", self, ("n_coupling_blocks", "context_kernel", "spatial_mixer_kernel"))
        _odd("flow", self, ("context_kernel", "spatial_mixer_kernel"))
        _one_of("flow", "ms_context_kind", self.ms_context_kind, ("shared", "task_conditioned"))
        if self.force_ms_context and not self.use_ms_context:
            _fail("flow.force_ms_context", "go with flow.use_ms_context=True (it keeps the multi-scale context with whitening)", True)
        if self.ms_context_kind != "shared" and not self.use_ms_context:
            _fail("flow.ms_context_kind", "be 'shared' unless flow.use_ms_context=True (it chooses the multi-scale context's kind)", self.ms_context_kind)
        if self.use_neighborhood_context:
            if not self.use_context:
                _fail("flow.use_neighborhood_context", "go with flow.use_context=True (it is the context branch's extractor)", True)
            _at_least_one("flow", self, ("neighborhood_kernel",))
            _odd("flow", self, ("neighborhood_kernel",))
            if not 0.0 <= self.neighborhood_gate <= 1.0:
                _fail("flow.neighborhood_gate", "be in [0, 1]", self.neighborhood_gate)
        if self.use_patch_attention:
            _at_least_one("flow", self, ("patch_attention_hidden",))
            if not 0.0 <= self.patch_attention_dropout < 1.0:
                _fail("flow.patch_attention_dropout", "be in [0, 1)", self.patch_attention_dropout)
        if self.use_context_gate and not self.use_context:
            _fail("flow.use_context_gate", "go with flow.use_context=True (the Baseline 2.0 gate scales the context branch)", True)
        if self.use_cpcf and not self.use_context:
            _fail("flow.use_cpcf", "go with flow.use_context=True (CPCF conditions the coupling on the context branch)", True)
        if self.use_cpcf and self.use_context_gate:
            _fail("flow.use_cpcf", "go with flow.use_context_gate=False (CPCF's context is not gated)", True)
        if self.cpcf_use_attention and not self.use_cpcf:
            _fail("flow.cpcf_use_attention", "go with flow.use_cpcf=True (it chooses CPCF's context extractor)", True)
        if self.cpcf_use_attention and self.use_neighborhood_context:
            _fail("flow.cpcf_use_attention", "go with flow.use_neighborhood_context=False (both replace the context conv)", True)


@dataclass
class ExpertConfig:
    """What each task adds: its input adapter, LoRA pairs and biases in the subnets, and its DIA."""

    input_adapter: InputAdapterKind = "whitening"
    """``whitening`` (V3-1, default), ``film`` (v3 FiLM adapter), ``instance_norm_mlp`` (the v1/v2
    InstanceNorm + zero-initialised MLP adapter, tasks 1+ only) or ``none``."""
    whitening_gamma_range: tuple[float, float] = (0.5, 2.0)
    whitening_beta_max: float = 2.0
    whitening_identity_reg: float = 0.1
    """Task 0 pull toward gamma=1, beta=0 (V3-1)."""
    film_use_norm: bool = True
    """``film`` adapter: the notes' v3 ``use_norm``, a LayerNorm before FiLM (as the notes). ``False``:
    FiLM and the MLP act on the raw features, and a fresh adapter is exactly the identity."""
    film_reference: bool = True
    """``film`` adapter: later tasks get task 0's per-channel patch mean and std as the notes' v3
    ``reference_mean`` / ``reference_std`` (fitted with task 0's statistics) and map their normalised
    features onto them; having a reference switches the notes' 90 % identity blend off. ``False``: no
    adapter has a reference, so every task is the 90 % identity blend, as the notes' adapter built
    without reference statistics. How the reference enters ``forward`` is this package's reading (the
    notes elide it); see :class:`~.experts.input_adapters.FiLMAdapter`."""
    use_lora: bool = True
    lora_rank: int = 32
    lora_alpha: float = 1.0
    lora_scaling: LoRAScaling = "alpha/rank"
    """v1 used ``alpha/(2*rank)``; v2 onward ``alpha/rank``."""
    lora_on_task0: bool = True
    """v2 onward: task 0 has its own LoRA expert too (v1: base only)."""
    lora_kind: LoRAKind = "standard"
    """``standard``: one low-rank pair per linear and task; ``spatial_contextual``: the lower-case v4
    SC-LoRA, a ``sc_lora_grid_size`` square grid of pairs per linear and task, bilinearly
    interpolated by patch position (:mod:`~.experts.spatial_lora`)."""
    sc_lora_grid_size: int = 4
    """SC-LoRA grid cells per side (the notes' ``--sc_lora_grid_size``)."""
    use_task_bias: bool = True
    use_dia: bool = True
    dia_n_blocks: int = 3
    """Notes and public code: 2 (``--dia_n_blocks 2``); 3 is a measured change (model README, "Beyond
    the notes")."""
    dia_hidden_ratio: float = 1.0
    """DIA subnet hidden width relative to the patch channels. Notes: 0.5 (``--dia_hidden_ratio 0.5``,
    the V3-3 ``DeepInvertibleAdapter`` default), which the V3 presets set. 1.0 here since the
    package's first version, because its patches have 152 channels where the public code's have 768
    (whose DIA, at 0.5, is 384 wide): 0.5 would leave 76 hidden units, 1.0 gives 152. No run
    comparing 1.0 with 0.5 on this package is recorded."""
    dia_clamp: float = 1.9

    def __post_init__(self) -> None:
        self.whitening_gamma_range = tuple(float(v) for v in self.whitening_gamma_range)  # type: ignore[assignment]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        _at_least_one("experts", self, ("lora_rank", "dia_n_blocks"))
        low, high = self.whitening_gamma_range
        if not 0 < low < 1 < high:
            _fail("experts.whitening_gamma_range", "satisfy 0 < low < 1 < high", (low, high))
        _one_of("experts", "input_adapter", self.input_adapter, INPUT_ADAPTERS)
        _one_of("experts", "lora_scaling", self.lora_scaling, ("alpha/rank", "alpha/(2*rank)"))
        _one_of("experts", "lora_kind", self.lora_kind, ("standard", "spatial_contextual"))
        _at_least_one("experts", self, ("sc_lora_grid_size",))


@dataclass
class LossConfig:
    """Training loss of each expert."""

    tail_weight: float = 1.0
    """Weight of the tail-aware term; the mean term gets ``1 - tail_weight``."""
    tail_top_ratio: float = 0.02
    logdet_reg: float = 1e-4
    center_loss_weight: float = 0.0
    """v5 centre loss on the latent (failed experiment)."""
    focal_gamma: float = 0.0
    """v7 focal NLL (failed experiment)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        if not 0.0 <= self.tail_weight <= 1.0:
            _fail("loss.tail_weight", "be in [0, 1]", self.tail_weight)
        if not 0.0 < self.tail_top_ratio <= 1.0:
            _fail("loss.tail_top_ratio", "be in (0, 1]", self.tail_top_ratio)


@dataclass
class RoutingConfig:
    """Which expert scores an image when the task id is hidden."""

    router: RouterKind = "memory"
    """``memory`` (beyond the notes): prototype top-k, then the candidate whose patch memory is nearest
    in the median patch (a defect is a minority of patches, so it does not decide);
    ``prototype``: Mahalanobis-nearest task mean of pooled features (public code);
    ``hybrid``: notes V3-5 two-stage (prototype top-k, then flow likelihood); ``none``: no routing."""
    router_top_k: int = 2
    """Shortlist length of the ``memory`` and ``hybrid`` routers (their cost does not grow with tasks)."""
    prototype_metric: PrototypeMetric = "auto"
    """Distance to the task prototypes: ``mahalanobis`` (per-task precision, the public code's router)
    or ``euclidean``; ``auto`` = Mahalanobis for the ``prototype`` router and Euclidean for the
    shortlist of the two-stage routers. A precision fitted on a few dozen images stretches the
    directions its images did not vary in, so a defect there pushes an image off its own task's
    shortlist; on the synthetic look-alike stream the Mahalanobis top-2 misses the right task for
    4.7% of the test images, the Euclidean top-2 for none (the real products: none with either)."""
    router_memory_size: int = 1024
    """Memory patches per task the ``memory`` router compares against (the first of the task's memory)."""
    router_patch_quantile: float = 0.5
    """``memory`` router: the quantile of an image's patch distances to a candidate's memory that is
    its score (0.5: the median; lower quantiles leave larger defects out of the decision)."""
    unknown_threshold: float | None = None
    """Flag "unknown product" when the nearest prototype is farther than this multiple of the
    task's calibrated (99th-percentile) training distance; ``None`` = off."""

    @property
    def resolved_prototype_metric(self) -> str:
        """``prototype_metric`` with ``auto`` resolved for this router."""
        if self.prototype_metric != "auto":
            return self.prototype_metric
        return "mahalanobis" if self.router == "prototype" else "euclidean"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        _one_of("routing", "router", self.router, ("memory", "prototype", "hybrid", "none"))
        _one_of("routing", "prototype_metric", self.prototype_metric, ("auto", "mahalanobis", "euclidean"))
        _at_least_one("routing", self, ("router_top_k", "router_memory_size"))
        if not 0.0 < self.router_patch_quantile <= 1.0:
            _fail("routing.router_patch_quantile", "be in (0, 1]", self.router_patch_quantile)


@dataclass
class ScoringConfig:
    """Image score and anomaly map from the patch scores."""

    score_top_k: int = 3
    """Image score: mean of the ``score_top_k`` highest patch NLLs."""
    image_score: ImageScore = "top_k_mean"
    """How the flow's patch NLLs become the image score: ``top_k_mean`` (the mean of the
    ``score_top_k`` largest), ``max`` (the largest patch) or ``p99`` (the 99th percentile of the
    patches, linear interpolation as ``torch.quantile``), the two the notes' V3/V4 analysis names.
    The patch memory's image term keeps its top-k mean."""
    global_score_weight: float = 0.5
    """Beyond the notes: image score = z(flow top-k) + weight * z(squared Mahalanobis of the pooled
    features to the task's Gaussian); 0 keeps the notes' flow-only image score."""
    global_score_layers: tuple[int, ...] = (4,)
    """timm ``out_indices`` whose globally pooled maps feed the global score and the router (4: the
    stride-32 stage of EfficientNet-Lite). Empty: pool the patch features instead."""
    position_gaussian_weight: float = 1.0
    """Beyond the notes: the anomaly map adds this weight times each patch's NLL under the task's
    position-conditional Gaussian to the flow NLL; 0 keeps the notes' flow-only map."""
    position_gaussian_shrinkage: float = 0.1
    """Added to the Gaussian's covariance diagonal, as a fraction of its mean variance."""
    patch_memory_size: int = 4096
    """Beyond the notes: a per-task memory of this many normal training patches (random, position
    embedding removed). The anomaly map then adds the surprisal of each patch's nearest-memory
    distance to the surprisal of its flow + Gaussian score (each against the task's training
    patches), and the image score adds ``patch_memory_weight`` times the z-score of the mean of the
    ``score_top_k`` largest memory distances; the ``memory`` router uses it. 0: no memory."""
    patch_memory_weight: float = 1.0
    anomaly_map_sigma: float = 4.0

    def __post_init__(self) -> None:
        self.global_score_layers = tuple(int(i) for i in self.global_score_layers)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        _at_least_one("scoring", self, ("score_top_k",))
        _one_of("scoring", "image_score", self.image_score, IMAGE_SCORES)
        for name in ("global_score_weight", "position_gaussian_weight", "position_gaussian_shrinkage", "patch_memory_size", "patch_memory_weight"):
            if getattr(self, name) < 0:
                _fail(f"scoring.{name}", "be >= 0", getattr(self, name))


@dataclass
class OptimConfig:
    """Optimiser of each task (AdamW, cosine schedule)."""

    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 0.5
    warmup_epochs: int = 0
    training_stages: TrainingStages = "single"
    """``single``: every epoch trains all of the task's trainable parameters; ``base_fast_slow``: the
    Baseline 2.0 trainer's stages (task 0 base; later tasks: their expert first, then the shared
    parts they still train), see :mod:`.training_stages`."""
    fast_epochs_ratio: float = 0.5
    """``base_fast_slow``: fraction of a later task's epochs in the fast stage (not in the notes)."""
    slow_lr_ratio: float = 0.1
    """``base_fast_slow``: the slow stage's learning rate as a fraction of ``lr`` (not in the notes)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        _one_of("optim", "training_stages", self.training_stages, TRAINING_STAGES)
        if not 0.0 < self.fast_epochs_ratio < 1.0:
            _fail("optim.fast_epochs_ratio", "be in (0, 1)", self.fast_epochs_ratio)
        if not self.slow_lr_ratio > 0.0:
            _fail("optim.slow_lr_ratio", "be > 0", self.slow_lr_ratio)


MS_CONTEXT_DROPPED = (
    "MoLEFlowConfig: flow.use_ms_context=True with experts.input_adapter='whitening' trains unstably (notes V3-2), "
    "so the multi-scale context is dropped; use input_adapter 'film' or 'none' to keep it "
    "(flow.force_ms_context=True keeps it with whitening, the notes' failed 'All V3' run)"
)
"""Warning of the one combination resolved rather than rejected, as the notes' ``AblationConfig`` resolves it."""

MS_CONTEXT_FORCED = (
    "MoLEFlowConfig: flow.force_ms_context=True keeps the multi-scale context with experts.input_adapter='whitening'; "
    "the notes saw this combination collapse training (V3 'All V3 (conflict)': mean image AUROC 0.4471)"
)
"""Warning when ``flow.force_ms_context`` overrides the drop of :data:`MS_CONTEXT_DROPPED`."""

_GROUPS: dict[str, type] = {
    "features": FeatureConfig,
    "flow": FlowConfig,
    "experts": ExpertConfig,
    "loss": LossConfig,
    "routing": RoutingConfig,
    "scoring": ScoringConfig,
    "optim": OptimConfig,
}
#: Flat field name -> its group (every field name is unique across groups).
FIELD_GROUPS: dict[str, str] = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}


def _group_from(group: str, value: object) -> object:
    cls = _GROUPS[group]
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        msg = f"MoLEFlowConfig.{group} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}"
        raise TypeError(msg)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        msg = f"Unknown MoLEFlowConfig.{group} field(s): {', '.join(unknown)}; {group} has {', '.join(sorted(known))}"
        raise ValueError(msg)
    return cls(**value)


@dataclass
class MoLEFlowConfig:
    """All hyper-parameters of the MoLE-Flow torch model, loss and scorer, in named groups.

    Groups may be given as their dataclasses or as dicts; the object validates itself on
    construction and raises ``ValueError`` naming ``<group>.<field>``.
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        for group in _GROUPS:
            setattr(self, group, _group_from(group, getattr(self, group)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        for group in _GROUPS:
            validate = getattr(getattr(self, group), "validate", None)
            if validate is not None:
                validate()
        if self.routing.router == "memory" and self.scoring.patch_memory_size < self.routing.router_memory_size:
            msg = (
                f"MoLEFlowConfig.routing.router='memory' compares {self.routing.router_memory_size} memory patches "
                f"per task (routing.router_memory_size), but scoring.patch_memory_size is "
                f"{self.scoring.patch_memory_size}; raise it, lower router_memory_size, or choose another router"
            )
            raise ValueError(msg)
        if self.optim.training_stages == "base_fast_slow" and not self._shared_parts_train_after_task0():
            msg = (
                "MoLEFlowConfig.optim.training_stages='base_fast_slow' trains the shared parts of later tasks in its "
                "slow stage, but every shared part is frozen after task 0 (flow.freeze_base_after_task0, "
                "freeze_mixer_after_task0, freeze_context_after_task0) or absent; unfreeze one or use 'single'"
            )
            raise ValueError(msg)
        if self.flow.use_ms_context and self.experts.input_adapter == "whitening":
            warnings.warn(MS_CONTEXT_FORCED if self.flow.force_ms_context else MS_CONTEXT_DROPPED, UserWarning, stacklevel=2)

    def _shared_parts_train_after_task0(self) -> bool:
        flow = self.flow
        mixer = flow.use_spatial_mixer or self.effective_ms_context or flow.use_patch_attention
        return (
            not flow.freeze_base_after_task0
            or (mixer and not flow.freeze_mixer_after_task0)
            or (flow.use_context and not flow.freeze_context_after_task0)
        )

    @property
    def effective_ms_context(self) -> bool:
        """Whether the model builds the MS context: V3-2's whitening + multi-scale context collapses
        training, so MS context is dropped with whitening unless ``flow.force_ms_context``."""
        flow = self.flow
        return flow.use_ms_context and (self.experts.input_adapter != "whitening" or flow.force_ms_context)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python nested dict (tuples become lists) for checkpoints and JSON."""

        def plain(value: Any) -> Any:  # noqa: ANN401
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return list(value) if isinstance(value, tuple) else value

        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoLEFlowConfig:
        """Build from a nested dict (``{"flow": {...}}``) or from flat field names (configs written
        before the groups); a mix of both works too. Unknown keys raise ``ValueError`` naming them."""
        groups: dict[str, dict[str, Any]] = {}
        unknown = []
        for key, value in data.items():
            if key in _GROUPS:
                if isinstance(value, Mapping):
                    groups.setdefault(key, {}).update(value)
                else:
                    groups[key] = value  # a group dataclass instance
            elif key in FIELD_GROUPS:
                group = groups.setdefault(FIELD_GROUPS[key], {})
                if not isinstance(group, dict):
                    group = groups[FIELD_GROUPS[key]] = asdict(group)
                group[key] = value
            else:
                unknown.append(key)
        if unknown:
            msg = f"Unknown MoLEFlowConfig field(s): {', '.join(sorted(unknown))}"
            raise ValueError(msg)
        return cls(**groups)

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> MoLEFlowConfig:
        """Build from a config stored in a checkpoint: a field the checkpoint predates gets the
        value that reproduces how that model was trained and scored, not today's default."""
        nested = cls.from_dict(data).to_dict() if data else {}
        present = _present_fields(data)
        for name, value in _ABSENT_FROM_OLDER_CHECKPOINTS.items():
            if name not in present:
                nested.setdefault(FIELD_GROUPS[name], {})[name] = value
        return cls.from_dict(nested)

    def updated(self, overrides: Mapping[str, Any]) -> MoLEFlowConfig:
        """A copy with ``overrides`` applied: keys ``"group.field"`` or plain field names."""
        nested = self.to_dict()
        for key, value in overrides.items():
            group, _, name = key.rpartition(".")
            group = group or FIELD_GROUPS.get(name, "")
            if group not in _GROUPS or name not in nested[group]:
                msg = f"Unknown MoLEFlowConfig field {key!r}"
                raise ValueError(msg)
            nested[group][name] = value
        return MoLEFlowConfig.from_dict(nested)


def _present_fields(data: Mapping[str, Any]) -> set[str]:
    present = set()
    for key, value in data.items():
        if key in _GROUPS:
            present |= set(value) if isinstance(value, Mapping) else {f.name for f in fields(_GROUPS[key])}
        else:
            present.add(key)
    return present


_ABSENT_FROM_OLDER_CHECKPOINTS: dict[str, Any] = {
    "grid_downsample": 1,
    "global_score_weight": 0.0,
    "position_gaussian_weight": 0.0,
    "patch_memory_size": 0,
    "router": "prototype",
    "prototype_metric": "mahalanobis",
}
"""Fields a saved config may lack, with the behaviour of the checkpoints that lacked them (``router``
defaulted to ``prototype`` before the patch memory existed; every router shortlisted by Mahalanobis
distance before ``prototype_metric``)."""
