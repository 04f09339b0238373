"""anomalib's PatchCore and FastFlow on MoLE-Flow's offline backbone, and their benchmark workers.

* PatchCore: ``anomalib.models.Patchcore`` unchanged; the backbone is the timm name
  ``<arch>.moleflow_offline`` (registered by ``register_offline_weights``) and the layers are the
  module names of MoLE-Flow's ``out_indices`` (``blocks.2``, ``blocks.4`` for EfficientNet-Lite).
* FastFlow: anomalib 2.7's ``FastflowModel`` accepts only resnet18 / wide_resnet50_2 / CaiT / DeiT
  (``ValueError`` otherwise), so :class:`BackboneFastflowModel` subclasses it and only replaces
  the constructor: the feature extractor is MoLE-Flow's own ``create_feature_extractor`` (timm
  ``features_only``, same stages), followed - as anomalib does for CNN backbones - by a
  LayerNorm per stage and one FastFlow block per stage. ``forward``, loss, anomaly map and
  optimiser (Adam, lr 1e-3, wd 1e-5) are anomalib's.

Both train in a plain loop over the task's anomalib datamodule (no Engine): PatchCore collects
patch embeddings and runs anomalib's coreset subsampling; FastFlow runs its epochs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import timm
import torch
from anomalib.models import Fastflow, Patchcore
from anomalib.models.components import AnomalibModule
from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.fastflow.loss import FastflowLoss
from anomalib.models.image.fastflow.torch_model import (
    FastflowModel,
    create_fast_flow_block,
)
from torch import nn

from anomalib_moleflow.backbones import (
    create_feature_extractor,
    feature_channels,
    register_offline_weights,
)
from anomalib_moleflow.continual.results_tables import ContinualResults

from .common import (
    Spec,
    evaluate,
    mean_of,
    numel,
    peak_rss_mib,
    saved_bytes,
    speed,
    timing_batch,
    train_images,
)
from .names import METRICS


def layer_names(backbone: str, out_indices: list[int]) -> list[str]:
    """anomalib/timm module names of the timm feature indices (``[2, 3]`` -> ``blocks.2, blocks.4``)."""
    arch = backbone.split(".")[0]
    model = timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(out_indices))
    return list(model.feature_info.module_name())


def make_patchcore(spec: Spec) -> Patchcore:
    """anomalib PatchCore on the offline backbone at the stages MoLE-Flow uses."""
    tagged = register_offline_weights(spec.backbone.split(".")[0])
    return Patchcore(
        backbone=tagged, layers=layer_names(spec.backbone, spec.out_indices), pre_trained=True,
        coreset_sampling_ratio=spec.coreset_ratio, num_neighbors=spec.num_neighbors,
        pre_processor=spec.pre_processor(), post_processor=False, evaluator=False, visualizer=False,
    )


@torch.no_grad()
def fit_patchcore(model: Patchcore, spec: Spec, tasks: list[int]) -> float:
    """Memory bank from the training images of ``tasks`` (one coreset over all of them); seconds."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    model.model.train()
    stream = spec.stream()
    for task in tasks:
        for images in train_images(model, stream, task):
            model.model(images)  # train mode: stores the patch embeddings
    model.model.subsample_embedding(sampling_ratio=model.coreset_sampling_ratio)
    model.model.eval()
    return time.perf_counter() - start


class BackboneFastflowModel(FastflowModel):
    """anomalib ``FastflowModel`` on any timm ``features_only`` CNN (here MoLE-Flow's backbone)."""

    def __init__(self, input_size: tuple[int, int], backbone: str, out_indices: list[int],
                 flow_steps: int = 8, conv3x3_only: bool = False, hidden_ratio: float = 1.0) -> None:
        nn.Module.__init__(self)  # FastflowModel.__init__ would reject the backbone
        self.input_size = input_size
        self.feature_extractor = create_feature_extractor(backbone, tuple(out_indices))
        channels = feature_channels(self.feature_extractor)
        scales = self.feature_extractor.feature_info.reduction()
        self.norms = nn.ModuleList()
        self.fast_flow_blocks = nn.ModuleList()
        for channel, scale in zip(channels, scales, strict=True):
            dims = [channel, int(input_size[0] / scale), int(input_size[1] / scale)]
            self.norms.append(nn.LayerNorm(dims, elementwise_affine=True))
            self.fast_flow_blocks.append(create_fast_flow_block(dims, conv3x3_only, hidden_ratio, flow_steps))
        self.anomaly_map_generator = AnomalyMapGenerator(input_size=input_size)


class BackboneFastflow(Fastflow):
    """anomalib ``Fastflow`` (loss, optimiser, steps) built on :class:`BackboneFastflowModel`."""

    def __init__(self, spec: Spec, flow_steps: int = 8, hidden_ratio: float = 1.0) -> None:
        AnomalibModule.__init__(self, pre_processor=spec.pre_processor(), post_processor=False,
                                evaluator=False, visualizer=False)
        self.backbone, self.pre_trained, self.flow_steps = spec.backbone, True, flow_steps
        self.conv3x3_only, self.hidden_ratio = False, hidden_ratio
        size = (spec.image_size, spec.image_size)
        self.model = BackboneFastflowModel(size, spec.backbone, spec.out_indices, flow_steps, False, hidden_ratio)
        self.loss = FastflowLoss()


def train_fastflow(model: BackboneFastflow, spec: Spec, task: int, epochs: int) -> float:
    """``epochs`` epochs of anomalib's FastFlow training step on ``task``; seconds."""
    start = time.perf_counter()
    optimizer = model.configure_optimizers()
    stream = spec.stream()
    model.model.train()
    for _ in range(epochs):
        for images in train_images(model, stream, task):
            hidden, jacobians = model.model(images)
            loss = model.loss(hidden, jacobians)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.model.eval()
    return time.perf_counter() - start


def _predict(model: nn.Module):
    return lambda images: model.model(images)


def _backbone_numel(model: nn.Module) -> int:
    return numel(model.model.feature_extractor, buffers=True)


def _summary(name: str, kind: str, final: dict[str, dict[str, float]], train_s: dict[str, float]) -> dict[str, Any]:
    return {
        "name": name, "kind": kind, "final": final,
        "mean": {key: mean_of(final, key) for key in METRICS},
        "train_seconds": train_s, "routing_accuracy": None,
    }


def run_per_task(spec: Spec, which: str) -> dict[str, Any]:
    """One model per task (task id known at test time): ``which`` is ``patchcore`` or ``fastflow``."""
    stream, final, train_s, models = spec.stream(), {}, {}, []
    for task, name in enumerate(spec.tasks):
        torch.manual_seed(spec.seed + task)
        if which == "patchcore":
            model = make_patchcore(spec)
            train_s[name] = fit_patchcore(model, spec, [task])
        else:
            model = BackboneFastflow(spec)
            train_s[name] = train_fastflow(model, spec, task, spec.epochs[task])
        final[name] = evaluate(model, _predict(model), stream, task)
        models.append(model)
    if which == "patchcore":  # the task-free PatchCore grows its bank from these per-task coresets
        banks = {"tasks": spec.tasks, "banks": [m.model.memory_bank for m in models], "seconds": train_s}
        torch.save(banks, _banks_path(spec))
    out = _summary(which, "per_task", final, train_s)
    last = models[-1]
    out.update(speed(_predict(last), timing_batch(last, stream), spec))
    backbone = _backbone_numel(last)
    added = [numel(m.model, buffers=True) - backbone for m in models]
    out.update({
        "forgetting": {key: 0.0 for key in METRICS},  # separate models cannot forget
        "params_total": sum(numel(m.model) - numel(m.model.feature_extractor) for m in models)
        + numel(last.model.feature_extractor),
        "params_added_per_task": numel(last.model) - numel(last.model.feature_extractor),
        "state_numel_total": backbone + sum(added),
        "state_numel_added_per_task": sum(added) / len(added),
        "model_file_bytes": sum(saved_bytes(m.model.state_dict()) for m in models),
        "settings": _settings(spec, which),
    })
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _sequential_summary(
    name: str, kind: str, model: AnomalibModule, results: ContinualResults, train_s: dict[str, float], spec: Spec,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Figures of a model evaluated on every seen task after each task (matrix, forgetting, costs)."""
    data = results.to_dict()
    final = {task: {key: data["final"][task][key] for key in METRICS} for task in spec.tasks}
    out = _summary(name, kind, final, train_s)
    out.update(speed(_predict(model), timing_batch(model, spec.stream()), spec))
    out.update({
        "forgetting": {key: data["forgetting"][key] for key in METRICS},
        "matrix": {key: data["matrix"][key] for key in METRICS},
        "params_total": numel(model.model),
        "params_added_per_task": 0,
        "state_numel_total": numel(model.model, buffers=True),
        "model_file_bytes": saved_bytes(model.model.state_dict()),
        **extra,
    })
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_fastflow_sequential(spec: Spec) -> dict[str, Any]:
    """One FastFlow fine-tuned task after task; every seen task evaluated after each (forgetting)."""
    stream, results, train_s = spec.stream(), ContinualResults(spec.tasks), {}
    torch.manual_seed(spec.seed)
    model = BackboneFastflow(spec)
    for task, name in enumerate(spec.tasks):
        train_s[name] = train_fastflow(model, spec, task, spec.epochs[task])
        for seen in range(task + 1):
            results.record(task, seen, evaluate(model, _predict(model), stream, seen))
    extra = {"state_numel_added_per_task": 0, "settings": _settings(spec, "fastflow")}
    return _sequential_summary("fastflow_seq", "sequential", model, results, train_s, spec, extra)


def _banks_path(spec: Spec) -> Path:
    return Path(spec.moleflow_dir).parent / "patchcore_banks.pt"


def _task_banks(spec: Spec) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Each task's coreset: from the per-task PatchCore worker's file, or built here."""
    path = _banks_path(spec)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["tasks"] == spec.tasks:
            return saved["banks"], saved["seconds"]
    banks, seconds = [], {}
    for task, name in enumerate(spec.tasks):
        torch.manual_seed(spec.seed + task)
        model = make_patchcore(spec)
        seconds[name] = fit_patchcore(model, spec, [task])
        banks.append(model.model.memory_bank)
    return banks, seconds


def run_patchcore_joint(spec: Spec) -> dict[str, Any]:
    """One PatchCore memory bank for all tasks (task-free), grown task after task.

    As a continual model must: task ``t`` adds the coreset of its own training patches
    (old images are gone, so earlier coresets are not recomputed); after each task every
    seen task is scored against the whole bank (forgetting: other products' patches in the
    bank make anomalies look normal).
    """
    stream, results = spec.stream(), ContinualResults(spec.tasks)
    banks, train_s = _task_banks(spec)
    model = make_patchcore(spec)
    for task in range(len(spec.tasks)):
        model.model.memory_bank = torch.cat(banks[: task + 1])
        model.model.eval()
        for seen in range(task + 1):
            results.record(task, seen, evaluate(model, _predict(model), stream, seen))
    extra = {
        "state_numel_added_per_task": int(model.model.memory_bank.numel()) / len(spec.tasks),
        "memory_bank_rows": int(model.model.memory_bank.shape[0]),
        "settings": _settings(spec, "patchcore"),
    }
    return _sequential_summary("patchcore_joint", "task_free", model, results, train_s, spec, extra)


def _settings(spec: Spec, which: str) -> dict[str, Any]:
    common = {"backbone": spec.backbone, "layers": layer_names(spec.backbone, spec.out_indices),
              "image_size": spec.image_size, "train_batch_size": spec.train_batch_size}
    if which == "patchcore":
        return {**common, "coreset_sampling_ratio": spec.coreset_ratio, "num_neighbors": spec.num_neighbors}
    return {**common, "epochs_per_task": list(spec.epochs), "flow_steps": 8, "hidden_ratio": 1.0,
            "optimizer": "Adam lr 1e-3 wd 1e-5 (anomalib)"}
