"""MoLE-Flow torch model: frozen backbone, per-task experts around a shared coupling flow.

Pipeline (V4.1)::

    image -> backbone -> patch features (+ position embedding)
          -> input adapter[task] -> spatial mixer (shared) -> shared flow + LoRA[task]
          -> DIA[task] -> z, log|det J| per patch -> NLL -> anomaly map, image score

Optional pre-flow modules of other versions sit after the spatial mixer, in this order: the V3-2
multi-scale context (shared, or conditioned per task) and the v6 patch self-attention (shared).

Beyond the notes (each can be switched off in the config): the map adds a per-task
position-conditional Gaussian NLL to the flow NLL, and the image score is fused with a
pooled-feature Gaussian score (:mod:`.task_statistics`).

The model owns routing and every per-task state: experts are keyed by task (``"0"``, ``"1"``,
...) in ``nn.ModuleDict``s, and the router prototypes, scoring statistics and thresholds are
:class:`~.task_statistics.TaskStatistics` keyed the same way, all in the state dict. Loading a
state dict creates the experts it holds. In eval mode ``forward`` returns a
:class:`RoutedInferenceBatch`: scores, maps and the expert that scored each image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .anomaly_map import AnomalyMapGenerator
from .config import MoLEFlowConfig
from .experts import DeepInvertibleAdapter, FiLMAdapter, build_input_adapter
from .feature_extractor import PatchFeatureExtractor
from .flow import LightweightMSContext, LightweightPatchAttention, SharedFlow, SpatialMixer, TaskConditionedMSContext
from .gaussian import pool_features
from .inference_batch import RoutedInferenceBatch
from .loss import patch_nll
from .routing import UNKNOWN, TaskRouter
from .stacked_experts import StackedExperts
from .state_dict_migration import migrate_legacy_keys, task_keys_in
from .task_statistics import GlobalScoreFusion, PatchMemory, PositionGaussian, TaskThresholds


class MoLEFlowModel(nn.Module):
    """Continual normalizing-flow anomaly model with one expert per task.

    Args:
        config: Model configuration; defaults to the V4.1 design.
        normalize_scores: Output each task's scores normalised by its own thresholds (its
            threshold at 0.5) once they are fitted, as a continual model that routes among
            products must; ``False`` outputs raw scores (for anomalib's post-processor).
    """

    def __init__(self, config: MoLEFlowConfig | None = None, normalize_scores: bool = False) -> None:
        super().__init__()
        self.config = config or MoLEFlowConfig()
        cfg = self.config
        self.feature_extractor = PatchFeatureExtractor(cfg)
        self.channels = self.feature_extractor.out_channels
        """Patch channels the flow models (the features may carry pooled global channels after them)."""
        self.grid_size = self.feature_extractor.grid_size
        self.input_adapters = nn.ModuleDict()
        self.spatial_mixer = SpatialMixer(self.channels, cfg.flow.spatial_mixer_kernel) if cfg.flow.use_spatial_mixer else None
        self.ms_context: LightweightMSContext | TaskConditionedMSContext | None = None
        if cfg.effective_ms_context:
            kind = TaskConditionedMSContext if cfg.flow.ms_context_kind == "task_conditioned" else LightweightMSContext
            self.ms_context = kind(self.channels, cfg.flow.ms_context_dilations)
        self.patch_attention = (
            LightweightPatchAttention(self.channels, cfg.flow.patch_attention_hidden, cfg.flow.patch_attention_dropout)
            if cfg.flow.use_patch_attention
            else None
        )
        """v6 patch self-attention, shared, just before the flow (after the adapter and the mixers)."""
        self.flow = SharedFlow(self.channels, cfg)
        self.dia = nn.ModuleDict()
        self.router = (
            TaskRouter(
                self.feature_extractor.total_channels,
                mode=cfg.routing.router,
                top_k=cfg.routing.router_top_k,
                metric=cfg.routing.resolved_prototype_metric,
                unknown_threshold=cfg.routing.unknown_threshold,
            )
            if cfg.routing.router != "none"
            else None
        )
        self.thresholds = TaskThresholds()
        self.global_score = (
            GlobalScoreFusion(self._global_input_channels(), cfg.scoring.global_score_weight)
            if cfg.scoring.global_score_weight > 0
            else None
        )
        self.position_gaussian = (
            PositionGaussian(self.grid_size, self.channels, cfg.scoring.position_gaussian_shrinkage)
            if cfg.scoring.position_gaussian_weight > 0
            else None
        )
        self.patch_memory = (
            PatchMemory(
                self.channels,
                cfg.scoring.patch_memory_size,
                top_k=cfg.scoring.score_top_k,
                router_size=cfg.routing.router_memory_size,
                router_quantile=cfg.routing.router_patch_quantile,
                position_embedding=self.feature_extractor.position_embedding[0] if cfg.features.use_position_embedding else None,
            )
            if cfg.scoring.patch_memory_size > 0
            else None
        )
        self.anomaly_map_generator = AnomalyMapGenerator(
            (cfg.features.image_size, cfg.features.image_size),
            sigma=cfg.scoring.anomaly_map_sigma,
            top_k=cfg.scoring.score_top_k,
            image_score=cfg.scoring.image_score,
        )
        self.task_keys: list[str] = []
        self.task_names: list[str] = []
        self.active_task: str | None = None
        """The expert that trains (and scores, while routing is off)."""
        self._normalize = normalize_scores
        self._oracle_key: str | None = None
        self.stacked_routing = False
        """Score routed batches in one pass over experts stacked along a task axis
        (:class:`~.stacked_experts.StackedExperts`, rebuilt when a weight or statistic changes) instead
        of one pass per expert present; equal to float rounding."""

    # ----------------------------------------------------------------- task experts
    @property
    def num_tasks(self) -> int:
        """Number of experts."""
        return len(self.task_keys)

    @property
    def task_statistics(self) -> list[nn.Module]:
        """Every per-task statistics module this configuration has (router, scoring, thresholds)."""
        modules = (self.router, self.global_score, self.position_gaussian, self.patch_memory, self.thresholds)
        return [m for m in modules if m is not None]

    def add_task(self, name: str | None = None) -> str:
        """Create the next expert (identity-initialised LoRA/DIA), make it active, return its key.

        Args:
            name: Product name of the task (default: its key).
        """
        index = len(self.task_keys)
        key = str(index)
        cfg = self.config
        reference = None
        if cfg.experts.input_adapter == "film" and cfg.experts.film_reference and index > 0:
            first = self.input_adapters[self.task_keys[0]]  # the v3 reference: task 0's patch statistics
            reference = (first.input_mean, first.input_std)
        adapter = build_input_adapter(cfg.experts, self.channels, index, reference)
        if adapter is not None:
            self.input_adapters[key] = adapter
        if isinstance(self.ms_context, TaskConditionedMSContext):
            self.ms_context.add_task(key)
        self.flow.add_adapter(key, lora=cfg.experts.use_lora and (index > 0 or cfg.experts.lora_on_task0))
        if cfg.experts.use_dia:
            experts = cfg.experts
            self.dia[key] = DeepInvertibleAdapter(self.channels, experts.dia_n_blocks, experts.dia_hidden_ratio, experts.dia_clamp)
        for statistics in self.task_statistics:
            statistics.add_task(key)
        device = next(self.flow.parameters()).device
        self.to(device)
        self.task_keys.append(key)
        self.task_names.append(str(name) if name is not None else key)
        self.set_task(key)
        return key

    def set_task(self, key: str | int) -> None:
        """Make expert ``key`` the active one (the one that trains)."""
        key = str(key)
        if key not in self.task_keys:
            msg = f"Unknown task expert {key!r}; known: {self.task_keys}"
            raise KeyError(msg)
        self.active_task = key
        self.flow.set_adapter(key)

    def expert_parameters(self, key: str) -> list[nn.Parameter]:
        """Parameters that belong to expert ``key`` alone."""
        params = self.flow.adapter_parameters(key)
        for container in (self.input_adapters, self.dia):
            if key in container:
                params += list(container[key].parameters())
        if isinstance(self.ms_context, TaskConditionedMSContext):
            params += self.ms_context.task_parameters(key)
        return params

    def shared_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Shared (task-independent) trainable parameters by group."""
        mixer = []
        for module in (self.spatial_mixer, self.ms_context, getattr(self, "patch_attention", None)):
            if isinstance(module, TaskConditionedMSContext):
                mixer += module.shared_parameters()  # its per-task conditions are expert parameters
            elif module is not None:
                mixer += list(module.parameters())
        return {"base": self.flow.base_parameters(), "mixer": mixer, "context": self.flow.context_parameters()}

    def trainable_parameters(self, key: str) -> list[nn.Parameter]:
        """What trains while learning task ``key`` (V4.1: shared parts on task 0 only)."""
        flow = self.config.flow
        first = self.task_keys.index(key) == 0
        shared = self.shared_parameters()
        params = self.expert_parameters(key)
        if first or not flow.freeze_base_after_task0:
            params += shared["base"]
        if first or not flow.freeze_mixer_after_task0:
            params += shared["mixer"]
        if first or not flow.freeze_context_after_task0:
            params += shared["context"]
        return params

    def prepare_task_training(self, key: str) -> list[nn.Parameter]:
        """Activate ``key``, set ``requires_grad`` on exactly its trainable parameters, return them."""
        self.set_task(key)
        trainable = self.trainable_parameters(key)
        ids = {id(p) for p in trainable}
        for param in self.parameters():
            param.requires_grad_(id(param) in ids)
        return trainable

    def regularization(self, key: str | None = None) -> torch.Tensor:
        """Input-adapter regulariser of the active (or given) expert."""
        key = key or self.active_task
        if key in self.input_adapters and hasattr(self.input_adapters[key], "regularization"):
            return self.input_adapters[key].regularization()
        return torch.zeros((), device=next(self.flow.parameters()).device)

    def context_statistics(self) -> dict[str, float]:
        """The context branch's strength per coupling block, for the training log: Baseline 1.5's
        ``context_alpha/block_<i>``, or Baseline 2.0's ``gate_{mean,std,min,max}/block_<i>`` of
        the last training forward, plus their summary over the blocks as the notes'
        ``get_context_info`` gives it (``alpha_mean``; ``gate_mean``/``gate_std`` averaged,
        ``gate_min``/``gate_max`` the extremes). Empty without a context branch (or before a
        gated forward ran)."""
        out: dict[str, float] = {}
        alphas, gates = [], []
        for index, subnet in enumerate(self.flow.subnets()):
            alpha, gate = subnet.get_context_alpha(), subnet.get_last_gate_stats()
            if alpha is not None:
                out[f"context_alpha/block_{index}"] = alpha
                alphas.append(alpha)
            if gate is not None:
                out.update({f"gate_{name}/block_{index}": value for name, value in gate.items()})
                gates.append(gate)
        if alphas:
            out["alpha_mean"] = sum(alphas) / len(alphas)
        if gates:
            out["gate_mean"] = sum(g["mean"] for g in gates) / len(gates)
            out["gate_std"] = sum(g["std"] for g in gates) / len(gates)
            out["gate_min"] = min(g["min"] for g in gates)
            out["gate_max"] = max(g["max"] for g in gates)
        return out

    # ----------------------------------------------------------------- computation
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-backbone patch features ``(B, H, W, C)``."""
        return self.feature_extractor(images)

    @contextmanager
    def _expert(self, key: str) -> Iterator[None]:
        """Route the shared flow's linears through expert ``key`` inside the block; the active task
        stays as it was."""
        if key != self.active_task:
            self.flow.set_adapter(key)
        try:
            yield
        finally:
            if key != self.active_task:
                self.flow.set_adapter(self.active_task)

    def flow_forward(self, features: torch.Tensor, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features to ``(z, log_jac_det)`` through expert ``key`` (default: the active one)."""
        key = key or self.active_task
        if key is None:
            msg = "MoLEFlowModel has no task expert yet: call add_task() first"
            raise RuntimeError(msg)
        if key not in self.task_keys:
            msg = f"Unknown task expert {key!r}; known: {self.task_keys}"
            raise KeyError(msg)
        x = features[..., : self.channels] if features.shape[-1] > self.channels else features
        with self._expert(key):
            if key in self.input_adapters:
                x = self.input_adapters[key](x)
            if self.spatial_mixer is not None:
                x = self.spatial_mixer(x)
            if isinstance(self.ms_context, TaskConditionedMSContext):
                x = self.ms_context(x, key)
            elif self.ms_context is not None:
                x = self.ms_context(x)
            if getattr(self, "patch_attention", None) is not None:  # absent from models pickled before it existed
                x = self.patch_attention(x)
            z, log_jac_det = self.flow(x)
        if key in self.dia:
            z, dia_log_jac_det = self.dia[key](z)
            log_jac_det = log_jac_det + dia_log_jac_det
        return z, log_jac_det

    def patch_scores(self, features: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Per-patch flow NLL ``(B, H, W)`` under expert ``key``."""
        z, log_jac_det = self.flow_forward(features, key)
        return patch_nll(z, log_jac_det)

    def map_scores(self, features: torch.Tensor, key: str | None = None, flow_nll: torch.Tensor | None = None) -> torch.Tensor:
        """Patch scores ``(B, H, W)`` behind the anomaly map: the flow NLL (``flow_nll`` if already
        computed), plus the weighted position-Gaussian NLL once expert ``key``'s Gaussian is fitted."""
        key = key or self.active_task
        scores = self.patch_scores(features, key) if flow_nll is None else flow_nll
        if self.position_gaussian is not None and self.position_gaussian.fitted(key):
            scores = scores + self.config.scoring.position_gaussian_weight * self.position_gaussian(key, features)
        return scores

    def score_features(self, features: torch.Tensor, key: str | None = None) -> RoutedInferenceBatch:
        """Raw image scores and anomaly maps of expert ``key`` from precomputed features.

        The image score comes from the flow NLL (top-k mean, fused with the global score and the
        patch memory's score); the map from :meth:`map_scores`, fused with the memory distances.
        """
        key = key or self.active_task
        flow_nll = self.patch_scores(features, key)
        pred_score = self.anomaly_map_generator.image_score(flow_nll)
        if self.global_score is not None:
            pred_score = self.global_score(key, pred_score, self.global_input(features))
        patch_scores = self.map_scores(features, key, flow_nll)
        if self.patch_memory is not None and self.patch_memory.fitted(key):
            distances = self.patch_memory.distances(key, features)
            pred_score = pred_score + self.config.scoring.patch_memory_weight * self.patch_memory.image_z(key, distances)
            patch_scores = self.patch_memory.fuse_map(key, patch_scores, distances)
        anomaly_map = self.anomaly_map_generator(patch_scores)
        return RoutedInferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def _global_input_channels(self) -> int:
        extractor = self.feature_extractor
        return extractor.global_channels or extractor.out_channels

    def global_input(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, G)`` input of the global score: the pooled deep stages, else the pooled patch features."""
        if self.feature_extractor.global_channels:
            return features[:, 0, 0, self.channels :]
        return pool_features(features[..., : self.channels])

    # ----------------------------------------------------------------- per-task statistics
    @torch.no_grad()
    def fit_task_statistics(self, key: str, train_features: Sequence[torch.Tensor]) -> None:
        """Fit expert ``key``'s statistics from its training features (chunks of ``(b, H, W, C)``):
        its router prototype, position Gaussian, global-score fusion and patch memory (each when
        configured; the memory last, as it references the map scores of the others), and for the first
        task's FiLM adapter the patch mean and std that later tasks' FiLM adapters take as reference."""
        chunks = list(train_features)
        if not chunks:
            msg = f"no training features to fit task {key!r}'s statistics"
            raise ValueError(msg)
        if self.router is not None:
            self.router.fit(key, torch.cat([pool_features(features) for features in chunks]))
        if self.position_gaussian is not None:
            self.position_gaussian.fit(key, chunks)
        if self.global_score is not None:
            pooled = torch.cat([self.global_input(features) for features in chunks])
            flow_scores = torch.cat([self.anomaly_map_generator.image_score(self.patch_scores(f, key)) for f in chunks])
            self.global_score.fit(key, pooled, flow_scores)
        if self.patch_memory is not None:
            self.patch_memory.fit(key, chunks, lambda f: self.map_scores(f, key))
        adapter = self.input_adapters[key] if key in self.input_adapters else None
        if key == self.task_keys[0] and isinstance(adapter, FiLMAdapter):  # the reference of later tasks
            adapter.fit_input_statistics([features[..., : self.channels] for features in chunks])

    @torch.no_grad()
    def fit_task_thresholds(
        self, key: str, pred_score: torch.Tensor, anomaly_map: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, float]:
        """Fit expert ``key``'s score normalisation and F1-optimal thresholds from its raw scores on
        labelled images (``pred_score (N,)``, ``anomaly_map (N, H, W)``, ``label (N,)``, ``mask (N, H, W)``)."""
        return self.thresholds.fit_from_scores(key, pred_score, anomaly_map, label, mask)

    # ----------------------------------------------------------------- routing
    @property
    def routing_active(self) -> bool:
        """Whether eval-mode ``forward`` routes images among experts (two or more fitted prototypes)."""
        return self._oracle_key is None and self.router is not None and self.router.n_fitted >= 2

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Expert index per image ``(B,)`` in ``task_keys`` order; ``-1`` = unknown product."""
        if self.router is None:
            msg = "routing is off (config.routing.router='none')"
            raise RuntimeError(msg)
        calibration = self.patch_memory.routing_calibration if self.config.routing.router == "memory" else None
        return self.router(pool_features(features), features, self._candidate_score, calibration)

    def _candidate_score(self, features: torch.Tensor, key: str) -> torch.Tensor:
        """Stage-2 routing score ``(b,)`` of images under task ``key`` (lower wins): the median
        memory distance (``memory`` router) or the expert's mean patch NLL (``hybrid``)."""
        if self.config.routing.router == "memory":
            return self.patch_memory.routing_score(key, features)
        return self.patch_scores(features, key).flatten(1).double().mean(dim=1)

    @contextmanager
    def oracle(self, key: str | int) -> Iterator[None]:
        """Score with expert ``key`` (the true task id) instead of routing, inside the block."""
        key = str(key)
        if key not in self.task_keys:
            msg = f"Unknown task expert {key!r}; known: {self.task_keys}"
            raise KeyError(msg)
        previous, self._oracle_key = self._oracle_key, key
        try:
            yield
        finally:
            self._oracle_key = previous

    @contextmanager
    def raw_scores(self) -> Iterator[None]:
        """Output raw (not per-task normalised) scores inside the block."""
        previous, self._normalize = self._normalize, False
        try:
            yield
        finally:
            self._normalize = previous

    @property
    def normalizes_scores(self) -> bool:
        """Whether scores come out per-task normalised (for tasks whose thresholds are fitted)."""
        return self._normalize

    # ----------------------------------------------------------------- eval output
    def _scored(self, features: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.score_features(features, key)
        if self._normalize and self.thresholds.fitted(key):
            return self.thresholds.normalize(key, batch.pred_score, batch.anomaly_map)
        return batch.pred_score, batch.anomaly_map

    def predict_features(self, features: torch.Tensor) -> RoutedInferenceBatch:
        """Eval output from features: routed among experts, or the oracle / active expert."""
        if not self.routing_active:
            key = self._oracle_key or self.active_task
            pred_score, anomaly_map = self._scored(features, key)
            index = torch.full((features.shape[0],), self.task_keys.index(key), dtype=torch.long, device=features.device)
            return RoutedInferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map, pred_task=index)
        if getattr(self, "stacked_routing", False):  # absent from models pickled before it existed
            pred_score, anomaly_map, route = self.stacked_experts().predict(self, features, self._normalize)
            return RoutedInferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map, pred_task=route)
        route = self.route(features)
        # An image of no known product is flagged as fully anomalous rather than scored.
        unknown = 1.0 if self._normalize else float("inf")
        size = self.anomaly_map_generator.input_size
        pred_score = features.new_full((features.shape[0],), unknown)
        anomaly_map = features.new_full((features.shape[0], 1, *size), unknown)
        for index in route.unique().tolist():
            if index == UNKNOWN:
                continue
            rows = (route == index).nonzero(as_tuple=True)[0]
            pred_score[rows], anomaly_map[rows] = self._scored(features[rows], self.task_keys[index])
        return RoutedInferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map, pred_task=route)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | RoutedInferenceBatch:
        """Train: ``(z, log_jac_det)`` of the active expert; eval: :class:`RoutedInferenceBatch`
        (routed among experts once two or more have fitted prototypes)."""
        features = self.extract_features(images)
        if self.training:
            return self.flow_forward(features)
        return self.predict_features(features)

    def stacked_experts(self) -> StackedExperts:
        """Every expert and per-task statistic along a task axis (built once, and again after a
        weight, statistic or the set of experts changes); not part of the state dict."""
        tensors = (t for name, t in (*self.named_parameters(), *self.named_buffers()) if not name.startswith("feature_extractor."))
        fitted = tuple(frozenset(s._fitted_keys) for s in self.task_statistics)
        stamp = (tuple(self.task_keys), fitted, tuple((t.data_ptr(), t._version) for t in tensors))
        cached = self.__dict__.get("_stacked_cache")
        if cached is None or cached[0] != stamp:
            cached = (stamp, StackedExperts(self))
            object.__setattr__(self, "_stacked_cache", cached)  # a plain attribute, not a submodule
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the stacked copy of the experts (rebuilt on use)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_stacked_cache"}

    # ----------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """Task names and the active task (plain data: loads with ``weights_only=True``)."""
        return {"task_names": list(self.task_names), "active_task": self.active_task}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved (the experts exist already, see loading)."""
        names = [str(n) for n in state.get("task_names", [])]
        if len(names) != self.num_tasks:
            msg = f"extra state names {len(names)} tasks, the state dict holds {self.num_tasks} experts"
            raise RuntimeError(msg)
        self.task_names = names
        if state.get("active_task") is not None:
            self.set_task(state["active_task"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # noqa: ANN401
        """Rename keys of older checkpoints, then create the experts the state dict holds before
        the submodules load their tensors."""
        migrate_legacy_keys(state_dict, prefix)
        extra = prefix + "_extra_state"
        keys = task_keys_in(state_dict, prefix)
        if extra not in state_dict:  # written before format 2: names are the keys, the last is active
            state_dict[extra] = {"task_names": list(keys), "active_task": keys[-1] if keys else None}
        while self.num_tasks < len(keys):
            self.add_task()
        super()._load_from_state_dict(state_dict, prefix, *args)
