"""Run spec, data, evaluation, timing and size measurements shared by every model worker."""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor
from reporting import peak_rss_mib as _peak_rss
from torch import nn

from anomalib_moleflow.continual.evaluation import loader_of_test_split
from anomalib_moleflow.continual.metrics import image_and_pixel_metrics
from anomalib_moleflow.continual.task_stream import TaskStream
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.pre_processing import prepare_batch


@dataclass
class Spec:
    """Everything a worker needs; the parent writes it once as JSON (``spec.json``)."""

    root: str
    tasks: list[str]
    backbone: str
    out_indices: list[int]
    image_size: int
    train_batch_size: int
    eval_batch_size: int
    num_workers: int
    epochs: list[int]
    """FastFlow epochs per task (default: MoLE-Flow's schedule)."""
    coreset_ratio: float = 0.1
    num_neighbors: int = 9
    timing_repeats: int = 10
    timing_warmup: int = 3
    seed: int = 0
    data_seed: int | None = None
    moleflow_cmd: list[str] = field(default_factory=list)
    moleflow_dir: str = ""

    def save(self, path: Path) -> None:
        """Write as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Spec:
        """Read from JSON."""
        return cls(**json.loads(Path(path).read_text()))

    def stream(self) -> TaskStream:
        """The task stream (same data settings as the MoLE-Flow run)."""
        return TaskStream(
            list(self.tasks), root=self.root, train_batch_size=self.train_batch_size,
            eval_batch_size=self.eval_batch_size, num_workers=self.num_workers, seed=self.data_seed,
        )

    def pre_processor(self) -> PreProcessor:
        """MoLE-Flow's pre-processing (resize to ``image_size``, backbone normalisation), for all models."""
        config = MoLEFlowConfig.from_dict({"features": {"backbone": self.backbone, "image_size": self.image_size}})
        return MoLEFlow.configure_moleflow_pre_processor(config)


def prepared(model: nn.Module, batch: Any, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ANN401
    """Pre-processed images of a raw batch and its boolean ``(B, H, W)`` masks at ``size``, for any
    anomalib model (every model here shares MoLE-Flow's pre-processor)."""
    return prepare_batch(model.pre_processor, batch.image, batch.gt_mask, size)


def train_images(model: nn.Module, stream: TaskStream, task: int) -> Iterable[torch.Tensor]:
    """Pre-processed training images of ``task``, batch by batch (``model.pre_processor`` applied)."""
    datamodule = stream.datamodule(task)
    datamodule.setup("fit")
    for batch in datamodule.train_dataloader():
        yield model.pre_processor.transform(batch.image)


@torch.no_grad()
def evaluate(model: nn.Module, predict: Callable[[torch.Tensor], Any], stream: TaskStream, task: int) -> dict[str, float]:
    """Image AUROC, pixel AUROC, pixel AP of ``predict`` on ``task``'s test set.

    ``predict(images)`` returns an ``InferenceBatch`` (``pred_score``, ``anomaly_map``); images and
    masks are prepared and the metrics computed exactly as MoLE-Flow's ``evaluate_task`` does.
    """
    scores, maps, labels, masks = [], [], [], []
    images_size = _size(model)
    for batch in loader_of_test_split(stream.datamodule(task)):
        images, mask = prepared(model, batch, images_size)
        out = predict(images)
        scores.append(out.pred_score.reshape(-1).cpu())
        amap = out.anomaly_map
        amap = amap[:, 0] if amap.ndim == 4 else amap
        if amap.shape[-2:] != images_size:
            amap = nn.functional.interpolate(amap[:, None], size=images_size, mode="bilinear")[:, 0]
        maps.append(amap.cpu())
        labels.append(batch.gt_label.cpu().long())
        if mask is not None:
            masks.append(mask)
    mask_t = torch.cat(masks) if masks else None
    # the metrics rescale raw scores themselves (no torchmetrics sigmoid on PatchCore's distances)
    return image_and_pixel_metrics(torch.cat(scores), torch.cat(maps), torch.cat(labels), mask_t)


def _size(model: nn.Module) -> tuple[int, int]:
    size = model.input_size
    return (int(size[0]), int(size[1]))


def timing_batch(model: nn.Module, stream: TaskStream, n: int = 32) -> torch.Tensor:
    """``n`` pre-processed test images taken in turn from every task (the same for all models)."""
    per_task = []
    for task in range(len(stream)):
        images = [model.pre_processor.transform(batch.image) for batch in loader_of_test_split(stream.datamodule(task))]
        per_task.append(torch.cat(images))
    rows = [per_task[i % len(per_task)][(i // len(per_task)) % len(per_task[i % len(per_task)])] for i in range(n)]
    return torch.stack(rows)


@torch.no_grad()
def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(fn: Callable[[torch.Tensor], object], images: torch.Tensor, spec: Spec) -> dict[str, float]:
    """Latency per image at batch 1 (ms) and throughput at batch 32 (images/s), medians."""
    one, many = images[:1].contiguous(), images[:32].contiguous()
    b1 = median_seconds(lambda: fn(one), spec.timing_repeats, spec.timing_warmup)
    b32 = median_seconds(lambda: fn(many), spec.timing_repeats, spec.timing_warmup)
    return {"latency_ms_b1": 1000.0 * b1, "throughput_b32": len(many) / b32, "timing_batch": len(many)}


def numel(module: nn.Module, buffers: bool = False) -> int:
    """Parameters (and buffers, e.g. a PatchCore memory bank) of ``module``."""
    total = sum(p.numel() for p in module.parameters())
    return total + (sum(b.numel() for b in module.buffers()) if buffers else 0)


def saved_bytes(state: dict[str, Any]) -> int:
    """Size of ``torch.save(state)`` in bytes (what a model file of it takes)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def peak_rss_mib() -> float:
    """Peak resident memory of this process or its largest finished child, MiB."""
    return max(_peak_rss().values())


def mean_of(final: dict[str, dict[str, float | None]], key: str) -> float | None:
    """Mean of ``final[task][key]`` over tasks that have it."""
    values = [row.get(key) for row in final.values() if row.get(key) is not None]
    return sum(values) / len(values) if values else None
