"""MoLE-Flow torch model: frozen backbone, per-task experts around a shared coupling flow.

Pipeline (V4.1)::

    image -> backbone -> patch features (+ position embedding)
          -> input adapter[task] -> spatial mixer (shared) -> base flow + LoRA[task]
          -> DIA[task] -> z, log|det J| per patch -> NLL -> anomaly map, image score

Experts are keyed by task (``"0"``, ``"1"``, ...) in ``nn.ModuleDict``s, so every
expert survives a checkpoint. In eval mode ``forward`` returns an ``InferenceBatch``.
"""

from __future__ import annotations

import torch
from anomalib.data import InferenceBatch
from torch import nn

from .anomaly_map import AnomalyMapGenerator
from .config import MoLEFlowConfig
from .context_modules import LightweightMSContext, SpatialMixer
from .dia import DeepInvertibleAdapter
from .feature_extractor import PatchFeatureExtractor
from .flow import BaseFlow
from .input_adapters import build_input_adapter
from .loss import patch_nll


class MoLEFlowModel(nn.Module):
    """Continual normalizing-flow anomaly model with one expert per task.

    Args:
        config: Model configuration; defaults to the V4.1 design.
    """

    def __init__(self, config: MoLEFlowConfig | None = None) -> None:
        super().__init__()
        self.config = config or MoLEFlowConfig()
        cfg = self.config
        self.feature_extractor = PatchFeatureExtractor(cfg)
        self.channels = self.feature_extractor.out_channels
        self.grid_size = self.feature_extractor.grid_size
        self.input_adapters = nn.ModuleDict()
        self.spatial_mixer = SpatialMixer(self.channels, cfg.spatial_mixer_kernel) if cfg.use_spatial_mixer else None
        self.ms_context = (
            LightweightMSContext(self.channels, cfg.ms_context_dilations) if cfg.effective_ms_context else None
        )
        self.flow = BaseFlow(self.channels, cfg)
        self.dia = nn.ModuleDict()
        self.task_keys: list[str] = []
        self.active_task: str | None = None
        self.anomaly_map_generator = AnomalyMapGenerator(
            (cfg.image_size, cfg.image_size),
            sigma=cfg.anomaly_map_sigma,
            top_k=cfg.score_top_k,
        )

    # ----------------------------------------------------------------- task experts
    @property
    def num_tasks(self) -> int:
        """Number of experts."""
        return len(self.task_keys)

    def add_task(self) -> str:
        """Create the next expert (identity-initialised LoRA/DIA) and return its key."""
        index = len(self.task_keys)
        key = str(index)
        cfg = self.config
        adapter = build_input_adapter(cfg.input_adapter, self.channels, index, cfg)
        if adapter is not None:
            self.input_adapters[key] = adapter
        self.flow.add_adapter(key, lora=cfg.use_lora and (index > 0 or cfg.lora_on_task0))
        if cfg.use_dia:
            self.dia[key] = DeepInvertibleAdapter(self.channels, cfg.dia_n_blocks, cfg.dia_hidden_ratio, cfg.dia_clamp)
        device = next(self.flow.parameters()).device
        self.to(device)
        self.task_keys.append(key)
        self.set_task(key)
        return key

    def set_task(self, key: str | int) -> None:
        """Make expert ``key`` the active one."""
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
        return params

    def shared_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Shared (task-independent) trainable parameters by group."""
        mixer = []
        for module in (self.spatial_mixer, self.ms_context):
            if module is not None:
                mixer += list(module.parameters())
        return {"base": self.flow.base_parameters(), "mixer": mixer, "context": self.flow.context_parameters()}

    def trainable_parameters(self, key: str) -> list[nn.Parameter]:
        """What trains while learning task ``key`` (V4.1: shared parts on task 0 only)."""
        cfg = self.config
        first = self.task_keys.index(key) == 0
        shared = self.shared_parameters()
        params = self.expert_parameters(key)
        if first or not cfg.freeze_base_after_task0:
            params += shared["base"]
        if first or not cfg.freeze_mixer_after_task0:
            params += shared["mixer"]
        if first or not cfg.freeze_context_after_task0:
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

    # ----------------------------------------------------------------- computation
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-backbone patch features ``(B, H, W, C)``."""
        return self.feature_extractor(images)

    def flow_forward(self, features: torch.Tensor, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features to ``(z, log_jac_det)`` through expert ``key`` (default: active)."""
        key = key or self.active_task
        if key is None:
            msg = "MoLEFlowModel has no task expert yet: call add_task() first"
            raise RuntimeError(msg)
        if key != self.active_task:
            self.set_task(key)
        x = features
        if key in self.input_adapters:
            x = self.input_adapters[key](x)
        if self.spatial_mixer is not None:
            x = self.spatial_mixer(x)
        if self.ms_context is not None:
            x = self.ms_context(x)
        z, log_jac_det = self.flow(x)
        if key in self.dia:
            z, dia_log_jac_det = self.dia[key](z)
            log_jac_det = log_jac_det + dia_log_jac_det
        return z, log_jac_det

    def patch_scores(self, features: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Per-patch NLL ``(B, H, W)`` under expert ``key``."""
        z, log_jac_det = self.flow_forward(features, key)
        return patch_nll(z, log_jac_det)

    def score_features(self, features: torch.Tensor, key: str | None = None) -> InferenceBatch:
        """Image scores and anomaly maps from precomputed features."""
        scores = self.patch_scores(features, key)
        return InferenceBatch(
            pred_score=self.anomaly_map_generator.image_score(scores),
            anomaly_map=self.anomaly_map_generator(scores),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | InferenceBatch:
        """Train: ``(z, log_jac_det)``; eval: ``InferenceBatch`` with score and map."""
        features = self.extract_features(images)
        if self.training:
            return self.flow_forward(features)
        return self.score_features(features)
