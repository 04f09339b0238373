"""Every expert of a :class:`~.torch_model.MoLEFlowModel` stacked along a task axis, for scoring a
batch that mixes products in one pass.

The per-task ``ModuleDict``s stay what trains (and what keeps old experts bit-identical); this
module is built from them for inference and export: each task's merged LoRA weights and biases
``(T, out, in)``, input-adapter and DIA weights, and every per-task statistic (position Gaussian,
global score, patch memory, thresholds, router prototypes) become buffers with a leading task
axis, gathered by each image's route. No step loops over tasks or reads a tensor's value in
Python, so the graph is static (``torch.export``, ONNX, OpenVINO): the router computes distances
to every prototype, and the two-stage routers score the ``top_k`` shortlisted candidates with
gathers (a loop over ``k``, not over tasks).

Numbers equal the per-expert loop's to float rounding (batched instead of per-expert matrix
products), in PyTorch and in an exported graph alike: the patch memory's surprisal interpolates
between training values and its distances are taken from the differences, so both move only as
much as their inputs do. A near-tie between two routing candidates can still flip the choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .experts import DeepInvertibleAdapter, FiLMAdapter, InstanceNormMLPAdapter, WhiteningAdapter
from .experts.input_adapters import instance_norm
from .experts.spatial_lora import SpatialLoRALinear
from .flow import TaskConditionedMSContext
from .gaussian import pool_features
from .loss import patch_nll
from .routing import UNKNOWN
from .task_statistics.patch_memory import (
    interpolated_count,
    patch_quantile,
    row_distance,
    surprisal_of_count,
    upper_counts,
)
from .task_statistics.thresholds import THRESHOLD_NAMES

if TYPE_CHECKING:
    from .torch_model import MoLEFlowModel

__all__ = ["StackedExperts", "gathered_linear"]


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """``x (B, N, in)`` through each image's task's linear: ``weight (T, out, in)``, ``bias (T, out)``."""
    return torch.baddbmm(bias[route][:, None], x, weight[route].transpose(1, 2))


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _nearest(x: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``(B, N)`` of each row of ``x (B, N, C)`` to its nearest row of its own
    ``bank (B, S, C)`` (squared row norms ``bank_sq (B, S)``): the nearest row found with one
    product, its distance taken from the difference, as
    :func:`~.task_statistics.patch_memory.nearest_distances`."""
    squared = (x**2).sum(-1, keepdim=True) - 2 * torch.bmm(x, bank.transpose(1, 2)) + bank_sq[:, None, :]
    nearest = squared.argmin(dim=-1, keepdim=True).expand(-1, -1, x.shape[-1])
    return row_distance(x, bank.gather(1, nearest))


def _surprisal(values: torch.Tensor, reference: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """:func:`~.task_statistics.patch_memory.surprisal` of ``values (B, H, W)`` under each image's own
    sorted ``reference (B, R)`` (its :func:`~.task_statistics.patch_memory.upper_counts` ``upper``)."""
    n = reference.shape[-1]
    count = interpolated_count(values.flatten(1), reference, upper).view(values.shape)
    return surprisal_of_count(values, count, reference[:, -1, None, None], reference[:, n // 2, None, None], n)


class StackedExperts(nn.Module):
    """The experts and per-task statistics of ``model`` along a task axis (a snapshot: rebuild it
    after the model changes). Its methods take the model for the shared parts.

    Args:
        model: The continual model, with at least one expert.
    """

    def __init__(self, model: MoLEFlowModel) -> None:
        super().__init__()
        keys = list(model.task_keys)
        if not keys:
            msg = "StackedExperts needs a model with at least one task expert"
            raise ValueError(msg)
        self.num_tasks = len(keys)
        self._device = next(model.flow.parameters()).device
        with torch.no_grad():
            self._stack_flow(model, keys)
            self._stack_adapters(model, keys)
            self._stack_ms_context(model, keys)
            self._stack_dia(model, keys)
            self._stack_statistics(model, keys)
            self._stack_router(model, keys)

    # ----------------------------------------------------------------- building
    def _put(self, name: str, tensors: list[torch.Tensor]) -> None:
        stacked = torch.stack([torch.as_tensor(t).detach().to(self._device) for t in tensors]).contiguous()
        self.register_buffer(name, stacked, persistent=False)

    def _stack_flow(self, model: MoLEFlowModel, keys: list[str]) -> None:
        self.n_flow_layers = len(model.flow.lora_layers())
        self.spatial_flow_layers: set[int] = set()
        """Indices of SC-LoRA layers: their grids are stacked apart, as the update varies per patch."""
        for index, layer in enumerate(model.flow.lora_layers()):
            weights, biases = [], []
            if isinstance(layer, SpatialLoRALinear):
                self._stack_spatial_lora(layer, keys, index)
            for key in keys:
                weight, bias = layer.base.weight, layer.base.bias
                if key in layer.lora_A and index not in self.spatial_flow_layers:  # as LoRALinear.merged_weights: W + s B A
                    weight = weight + layer.scaling * (layer.lora_B[key].weight @ layer.lora_A[key].weight)
                if key in layer.task_bias:
                    bias = bias + layer.task_bias[key]
                weights.append(weight)
                biases.append(bias)
            self._put(f"flow_weight_{index}", weights)
            self._put(f"flow_bias_{index}", biases)

    def _stack_spatial_lora(self, layer: SpatialLoRALinear, keys: list[str], index: int) -> None:
        """SC-LoRA grids ``(T, G, G, rank, in)`` and ``(T, G, G, out, rank)`` (zeros for an expert without LoRA)."""
        self.spatial_flow_layers.add(index)
        g, rank, weight = layer.grid_size, layer.rank, layer.base.weight
        empty_a = weight.new_zeros(g, g, rank, layer.in_features)
        empty_b = weight.new_zeros(g, g, layer.out_features, rank)
        self._put(f"flow_lora_a_{index}", [layer.lora_A[k] if k in layer.lora_A else empty_a for k in keys])
        self._put(f"flow_lora_b_{index}", [layer.lora_B[k] if k in layer.lora_B else empty_b for k in keys])

    def _stack_adapters(self, model: MoLEFlowModel, keys: list[str]) -> None:
        adapters = [model.input_adapters[key] for key in keys if key in model.input_adapters]
        self.adapter_kind = "none"
        if not adapters:
            return
        if all(isinstance(a, InstanceNormMLPAdapter) for a in adapters):  # v1/v2: task 0 has none
            self._stack_instance_norm_adapters(model, keys)
            return
        if len(adapters) != len(keys):
            msg = "StackedExperts needs an input adapter for every task or for none"
            raise ValueError(msg)
        if all(isinstance(a, WhiteningAdapter) for a in adapters):
            self.adapter_kind = "whitening"
            self.whiten_eps = adapters[0].whiten.eps
            self._put("adapter_gamma", [a.gamma for a in adapters])
            self._put("adapter_beta", [a.beta for a in adapters])
        elif all(isinstance(a, FiLMAdapter) for a in adapters):
            self.adapter_kind = "film"
            normed = [a for a in adapters if getattr(a, "use_norm", True)]
            self.film_eps = normed[0].layer_norm.eps if normed else 1e-5
            ones, zeros = torch.ones_like(adapters[0].film_gamma), torch.zeros_like(adapters[0].film_gamma)
            self._put("film_norm", [torch.tensor(bool(getattr(a, "use_norm", True))) for a in adapters])
            self._put("film_ln_weight", [a.layer_norm.weight if a in normed else ones for a in adapters])
            self._put("film_ln_bias", [a.layer_norm.bias if a in normed else zeros for a in adapters])
            mapped = [a in normed and a.has_reference and hasattr(a, "reference_std") for a in adapters]
            self._put("film_ref_std", [a.reference_std if m else ones for a, m in zip(adapters, mapped, strict=True)])
            self._put("film_ref_mean", [a.reference_mean if m else zeros for a, m in zip(adapters, mapped, strict=True)])
            self._put("film_gamma", [a.film_gamma for a in adapters])
            self._put("film_beta", [a.film_beta for a in adapters])
            for i in (0, 2):
                self._put(f"film_mlp_weight_{i}", [a.mlp[i].weight for a in adapters])
                self._put(f"film_mlp_bias_{i}", [a.mlp[i].bias for a in adapters])
            self._put("film_gate", [a.residual_gate for a in adapters])
            self._put("film_reference", [torch.tensor(a.has_reference) for a in adapters])
        else:
            msg = f"StackedExperts cannot stack input adapters of kinds {sorted({type(a).__name__ for a in adapters})}"
            raise TypeError(msg)

    def _stack_instance_norm_adapters(self, model: MoLEFlowModel, keys: list[str]) -> None:
        """v1/v2 adapters; a task without one (task 0) gets zeros and ``instance_norm_present`` false."""
        adapters = model.input_adapters
        template = next(iter(adapters.values()))
        self.adapter_kind = "instance_norm_mlp"
        self.instance_norm_eps = template.eps
        tensors = {f"weight_{i}": lambda a, i=i: a.mlp[i].weight for i in (0, 2)}
        tensors |= {f"bias_{i}": lambda a, i=i: a.mlp[i].bias for i in (0, 2)}
        tensors["gate"] = lambda a: a.residual_gate
        for name, get in tensors.items():
            self._put(f"instance_norm_{name}", [get(adapters[k]) if k in adapters else torch.zeros_like(get(template)) for k in keys])
        self._put("instance_norm_present", [torch.tensor(k in adapters) for k in keys])

    def _stack_ms_context(self, model: MoLEFlowModel, keys: list[str]) -> None:
        """Each task's condition of a :class:`~.flow.TaskConditionedMSContext` (its convs are shared)."""
        self.task_conditioned_ms_context = isinstance(model.ms_context, TaskConditionedMSContext)
        if not self.task_conditioned_ms_context:
            return
        conditions = [model.ms_context.conditions[key] for key in keys]
        for name in ("branch_weights", "gamma", "beta", "gate"):
            self._put(f"ms_context_{name}", [getattr(c, name) for c in conditions])

    def _stack_dia(self, model: MoLEFlowModel, keys: list[str]) -> None:
        dias: list[DeepInvertibleAdapter] = [model.dia[key] for key in keys if key in model.dia]
        self.dia_blocks: list[tuple[float, bool, int, int]] = []  # clamp, swap, len1, len2
        if not dias:
            return
        if len(dias) != len(keys):
            msg = "StackedExperts needs a DIA for every task or for none"
            raise ValueError(msg)
        for b, block in enumerate(dias[0].inn.module_list):
            self.dia_blocks.append((block.clamp, block.swap, block.len1, block.len2))
            for net in ("s_net", "t_net"):
                for i in (0, 2, 4):
                    layers = [getattr(d.inn.module_list[b], net)[i] for d in dias]
                    self._put(f"dia_{b}_{net}_weight_{i}", [layer.weight for layer in layers])
                    self._put(f"dia_{b}_{net}_bias_{i}", [layer.bias for layer in layers])

    def _fitted(self, statistics: nn.Module, keys: list[str]) -> list[torch.Tensor]:
        return [torch.tensor(statistics.fitted(key)) for key in keys]

    def _stack_statistics(self, model: MoLEFlowModel, keys: list[str]) -> None:
        self.has_position_gaussian = model.position_gaussian is not None
        if self.has_position_gaussian:
            tasks = model.position_gaussian.tasks
            self._put("position_mean", [tasks[k].mean for k in keys])
            self._put("position_precision", [tasks[k].precision for k in keys])
            self._put("position_fitted", self._fitted(model.position_gaussian, keys))
        self.has_global_score = model.global_score is not None
        if self.has_global_score:
            tasks = model.global_score.tasks
            self._put("global_mean", [tasks[k].mean for k in keys])
            self._put("global_precision", [tasks[k].precision for k in keys])
            self._put("global_stats", [tasks[k].stats for k in keys])
            self._put("global_fitted", self._fitted(model.global_score, keys))
        self.has_patch_memory = model.patch_memory is not None
        if self.has_patch_memory:
            tasks = model.patch_memory.tasks
            self._put("memory_bank", [tasks[k].bank for k in keys])
            self._put("memory_bank_sq", [(tasks[k].bank ** 2).sum(1) for k in keys])
            self._put("memory_distance_reference", [tasks[k].distance_reference for k in keys])
            self._put("memory_map_reference", [tasks[k].map_reference for k in keys])
            self._put("memory_distance_upper", [upper_counts(tasks[k].distance_reference[None])[0] for k in keys])
            self._put("memory_map_upper", [upper_counts(tasks[k].map_reference[None])[0] for k in keys])
            self._put("memory_image_stats", [tasks[k].image_stats for k in keys])
            self._put("memory_routing_calibration", [tasks[k].routing_calibration for k in keys])
            self._put("memory_fitted", self._fitted(model.patch_memory, keys))
        tasks = model.thresholds.tasks
        self._put("thresholds", [torch.stack([getattr(tasks[k], n) for n in THRESHOLD_NAMES]) for k in keys])
        self._put("thresholds_fitted", self._fitted(model.thresholds, keys))

    def _stack_router(self, model: MoLEFlowModel, keys: list[str]) -> None:
        router = model.router
        self.has_router = router is not None and router.n_fitted > 0
        if not self.has_router:
            return
        whitening, means, fitted = router._statistics()
        self.router_whitened = whitening is not None
        if whitening is not None:
            self.register_buffer("router_whitening", whitening.clone(), persistent=False)
        self.register_buffer("router_means", means.clone(), persistent=False)
        self.register_buffer("router_fitted", fitted.clone(), persistent=False)
        self.register_buffer("router_calibration", router.calibrations().clone(), persistent=False)
        self.router_channels = router.channels
        self.router_mode = model.config.routing.router
        self.router_k = max(1, min(router.top_k, router.n_fitted)) if router.mode != "prototype" else 1
        self.unknown_threshold = router.unknown_threshold
        self.router_memory_size = model.patch_memory.router_size if model.patch_memory is not None else 0
        self.router_quantile = model.patch_memory.router_quantile if model.patch_memory is not None else 0.5

    # ----------------------------------------------------------------- experts
    def _adapter(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        if self.adapter_kind == "whitening":
            whitened = F.layer_norm(x, x.shape[-1:], eps=self.whiten_eps)
            return self.adapter_gamma[route][:, None, None] * whitened + self.adapter_beta[route][:, None, None]
        if self.adapter_kind == "film":
            batch, channels = x.shape[0], x.shape[-1]
            normed = F.layer_norm(x, x.shape[-1:], eps=self.film_eps)
            normed = normed * self.film_ln_weight[route][:, None, None] + self.film_ln_bias[route][:, None, None]
            normed = normed * self.film_ref_std[route][:, None, None] + self.film_ref_mean[route][:, None, None]
            normed = torch.where(self.film_norm[route][:, None, None, None], normed, x)
            y = self.film_gamma[route][:, None, None] * normed + self.film_beta[route][:, None, None]
            flat = y.reshape(batch, -1, channels)
            hidden = F.gelu(gathered_linear(flat, self.film_mlp_weight_0, self.film_mlp_bias_0, route))
            mlp = gathered_linear(hidden, self.film_mlp_weight_2, self.film_mlp_bias_2, route).view_as(y)
            y = y + self.film_gate[route][:, None, None] * mlp
            return torch.where(self.film_reference[route][:, None, None, None], y, 0.9 * x + 0.1 * y)
        if self.adapter_kind == "instance_norm_mlp":
            batch, channels = x.shape[0], x.shape[-1]
            normed = instance_norm(x, self.instance_norm_eps)
            flat = normed.reshape(batch, -1, channels)
            hidden = F.gelu(gathered_linear(flat, self.instance_norm_weight_0, self.instance_norm_bias_0, route))
            mlp = gathered_linear(hidden, self.instance_norm_weight_2, self.instance_norm_bias_2, route).view_as(normed)
            y = normed + self.instance_norm_gate[route][:, None, None] * mlp
            return torch.where(self.instance_norm_present[route][:, None, None, None], y, x)
        return x

    def _dia(self, z: torch.Tensor, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.dia_blocks:
            return z, None
        batch, height, width, channels = z.shape
        x = z.reshape(batch, -1, channels)
        total: torch.Tensor | int = 0
        for b, (clamp, swap, len1, len2) in enumerate(self.dia_blocks):
            x2, x1 = torch.split(x, [len2, len1], dim=-1) if swap else torch.split(x, [len1, len2], dim=-1)[::-1]
            s = self._dia_net(x1, b, "s_net", route)
            s = clamp * torch.tanh(s / clamp)
            t = self._dia_net(x1, b, "t_net", route)
            y2 = x2 * torch.exp(s) + t
            x = torch.cat([y2, x1], dim=-1) if swap else torch.cat([x1, y2], dim=-1)
            total = s.sum(dim=-1) + total
        return x.view(batch, height, width, channels), total.view(batch, height, width)

    def _dia_net(self, x: torch.Tensor, block: int, net: str, route: torch.Tensor) -> torch.Tensor:
        for i in (0, 2, 4):
            weight, bias = getattr(self, f"dia_{block}_{net}_weight_{i}"), getattr(self, f"dia_{block}_{net}_bias_{i}")
            x = gathered_linear(x, weight, bias, route)
            if i < 4:
                x = F.relu(x)
        return x

    def flow_forward(self, model: MoLEFlowModel, features: torch.Tensor, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log_jac_det)`` of each image under its own expert (``route (B,)``, task indices)."""
        x = features[..., : model.channels] if features.shape[-1] > model.channels else features
        x = self._adapter(x, route)
        if model.spatial_mixer is not None:
            x = model.spatial_mixer(x)
        if self.task_conditioned_ms_context:
            conditions = (getattr(self, f"ms_context_{n}")[route] for n in ("branch_weights", "gamma", "beta", "gate"))
            x = model.ms_context.conditioned(x, *conditions)
        elif model.ms_context is not None:
            x = model.ms_context(x)
        if getattr(model, "patch_attention", None) is not None:  # absent from models pickled before it existed
            x = model.patch_attention(x)
        layers = model.flow.lora_layers()
        for index, layer in enumerate(layers):
            layer.routed = (getattr(self, f"flow_weight_{index}")[route], getattr(self, f"flow_bias_{index}")[route])
            if index in self.spatial_flow_layers:
                layer.routed += (getattr(self, f"flow_lora_a_{index}")[route], getattr(self, f"flow_lora_b_{index}")[route])
        try:
            z, log_jac_det = model.flow(x)
        finally:
            for layer in layers:
                layer.routed = None
        z, dia_log_jac_det = self._dia(z, route)
        if dia_log_jac_det is not None:
            log_jac_det = log_jac_det + dia_log_jac_det
        return z, log_jac_det

    # ----------------------------------------------------------------- scores
    def _patches(self, model: MoLEFlowModel, features: torch.Tensor) -> torch.Tensor:
        memory = model.patch_memory
        x = features[..., : memory.channels]
        if memory.position_embedding is not None:
            x = x - memory.position_embedding.to(x.dtype)
        return x.reshape(x.shape[0], -1, memory.channels)

    def memory_distances(self, model: MoLEFlowModel, features: torch.Tensor, route: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Nearest-memory distance ``(B, H, W)`` of each patch under its image's task (first ``size`` memory patches)."""
        bank, bank_sq = self.memory_bank[route, :size], self.memory_bank_sq[route, :size]
        x = self._patches(model, features)
        return _nearest(x, bank.to(x.dtype), bank_sq.to(x.dtype)).view(features.shape[:3])

    def score(self, model: MoLEFlowModel, features: torch.Tensor, route: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` and maps ``(B, 1, H, W)`` of each image under its task ``route (B,)``
        (indices ``>= 0``): as :meth:`MoLEFlowModel.score_features`, then normalised per task
        (where that task's thresholds are fitted) when ``normalize``."""
        cfg = model.config.scoring
        flow_nll = patch_nll(*self.flow_forward(model, features, route))
        pred_score = model.anomaly_map_generator.image_score(flow_nll)
        if self.has_global_score:
            pred_score = self._global_score(model, features, route, pred_score)
        patch_scores = flow_nll
        if self.has_position_gaussian:
            x = features[..., : model.channels]
            diff = x - self.position_mean[route].to(x.dtype)
            flat = diff.reshape(diff.shape[0], -1, diff.shape[-1])
            term = 0.5 * (torch.bmm(flat, self.position_precision[route].to(x.dtype)) * flat).sum(dim=-1).view(flow_nll.shape)
            fitted = self.position_fitted[route][:, None, None]
            patch_scores = torch.where(fitted, patch_scores + cfg.position_gaussian_weight * term, patch_scores)
        if self.has_patch_memory:
            distances = self.memory_distances(model, features, route)
            flat = distances.flatten(1)
            top = flat.topk(max(1, min(model.patch_memory.top_k, flat.shape[1])), dim=1).values.mean(dim=1)
            stats = self.memory_image_stats[route].to(distances.dtype)
            fitted = self.memory_fitted[route]
            memory_score = pred_score + cfg.patch_memory_weight * ((top - stats[:, 0]) / stats[:, 1])
            pred_score = torch.where(fitted, memory_score, pred_score)
            fused = _surprisal(
                patch_scores, self.memory_map_reference[route].to(patch_scores.dtype), self.memory_map_upper[route]
            ) + _surprisal(distances, self.memory_distance_reference[route].to(distances.dtype), self.memory_distance_upper[route])
            patch_scores = torch.where(fitted[:, None, None], fused, patch_scores)
        anomaly_map = model.anomaly_map_generator(patch_scores)
        if normalize:
            pred_score, anomaly_map = self._normalize(pred_score, anomaly_map, route)
        return pred_score, anomaly_map

    def _global_score(self, model: MoLEFlowModel, features: torch.Tensor, route: torch.Tensor, flow_scores: torch.Tensor) -> torch.Tensor:
        pooled = model.global_input(features)
        diff = (pooled.double() - self.global_mean[route].double())[:, None]
        squared = (torch.bmm(diff, self.global_precision[route].double()) * diff).sum(dim=-1).view(-1)
        global_score = squared.clamp_min(0).sqrt().square().to(pooled.dtype)
        stats = self.global_stats[route].to(flow_scores.dtype)
        fused = (flow_scores - stats[:, 0]) / stats[:, 1] + model.global_score.weight * ((global_score - stats[:, 2]) / stats[:, 3])
        return torch.where(self.global_fitted[route], fused, flow_scores)

    def _normalize(self, pred_score: torch.Tensor, anomaly_map: torch.Tensor, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.thresholds[route]  # (B, 6) in THRESHOLD_NAMES order
        fitted = self.thresholds_fitted[route]

        def scale(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
            return ((x - threshold) / (high - low).clamp(min=1e-12) + 0.5).clamp(0.0, 1.0)

        score = scale(pred_score, values[:, 0], values[:, 1], values[:, 2])
        view = (-1,) + (1,) * (anomaly_map.dim() - 1)
        amap = scale(anomaly_map, values[:, 3].view(view), values[:, 4].view(view), values[:, 5].view(view))
        return torch.where(fitted, score, pred_score), torch.where(fitted.view(view), amap, anomaly_map)

    # ----------------------------------------------------------------- routing
    def prototype_distances(self, features: torch.Tensor) -> torch.Tensor:
        """Distance ``(B, T)`` of each image's pooled features to every task's prototype (``inf`` while unfitted)."""
        x = pool_features(features).float()
        if self.router_whitened:
            projected = (x @ self.router_whitening).view(x.shape[0], self.num_tasks, self.router_channels) - self.router_means
            dist = projected.square().sum(dim=-1).sqrt()
        elif _exporting():  # cdist has no ONNX form; the same distances to float rounding
            dist = (x[:, None] - self.router_means[None]).square().sum(dim=-1).sqrt()
        else:
            dist = torch.cdist(x, self.router_means)
        return torch.where(self.router_fitted[None], dist, torch.full_like(dist, float("inf")))

    def candidate_score(self, model: MoLEFlowModel, features: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Stage-2 routing score ``(B,)`` of each image under its candidate ``task (B,)`` (lower wins)."""
        if self.router_mode == "memory":
            distances = self.memory_distances(model, features, task, self.router_memory_size)
            return patch_quantile(distances.flatten(1), self.router_quantile)
        flow_nll = patch_nll(*self.flow_forward(model, features, task))
        return flow_nll.flatten(1).double().mean(dim=1)

    def route(self, model: MoLEFlowModel, features: torch.Tensor) -> torch.Tensor:
        """Task index per image ``(B,)``, :data:`~.routing.UNKNOWN` for unknown products, as
        :meth:`MoLEFlowModel.route` decides it."""
        if not self.has_router:
            msg = "StackedExperts has no fitted router prototype"
            raise RuntimeError(msg)
        distances = self.prototype_distances(features)
        if self.router_k == 1:
            return self._flag_by_distance(distances, distances.argmin(dim=1))
        candidates = distances.topk(self.router_k, dim=1, largest=False).indices  # (B, k)
        scores = torch.stack(
            [self.candidate_score(model, features, candidates[:, j]).double() for j in range(self.router_k)], dim=1
        )
        scores = torch.nan_to_num(scores, nan=float("inf"))
        best = scores.argmin(dim=1, keepdim=True)
        choice, best_score = candidates.gather(1, best).squeeze(1), scores.gather(1, best).squeeze(1)
        if self.router_mode != "memory":
            return self._flag_by_distance(distances, choice)
        if self.unknown_threshold is None:
            return choice
        scale = self.memory_routing_calibration[choice].to(best_score.dtype)
        return torch.where(best_score > self.unknown_threshold * scale, torch.full_like(choice, UNKNOWN), choice)

    def _flag_by_distance(self, distances: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        if self.unknown_threshold is None:
            return choice
        chosen = distances.gather(1, choice[:, None]).squeeze(1)
        limit = self.unknown_threshold * self.router_calibration.to(distances)[choice]
        return torch.where(chosen > limit, torch.full_like(choice, UNKNOWN), choice)

    def predict(self, model: MoLEFlowModel, features: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed ``(pred_score (B,), anomaly_map (B, 1, H, W), route (B,))`` in one pass; an image of
        no known product gets the flag value (1 normalised, else ``inf``) everywhere."""
        route = self.route(model, features)
        known = route != UNKNOWN
        pred_score, anomaly_map = self.score(model, features, route.clamp_min(0), normalize)
        flag = 1.0 if normalize else float("inf")
        pred_score = torch.where(known, pred_score, torch.full_like(pred_score, flag))
        anomaly_map = torch.where(known[:, None, None, None], anomaly_map, torch.full_like(anomaly_map, flag))
        return pred_score, anomaly_map, route
