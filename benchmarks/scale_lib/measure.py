"""The scale benchmark's continual run and what it measures after each task.

:class:`ScaleRunner` is the package's :class:`ContinualRunner`; after its evaluation of the
seen tasks it times the routed model, reads memory and counts parameters, giving one row
(keys :data:`ROW_KEYS`) per number of tasks.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data.utils import read_image
from reporting import current_rss_mib, peak_rss_mib

from anomalib_moleflow.continual.runner import (
    ContinualRunner,
    RunOptions,
    TrainerOptions,
)
from anomalib_moleflow.continual.task_stream import TaskStream
from anomalib_moleflow.data.synthetic import make_products
from anomalib_moleflow.models.moleflow import MoLEFlowConfig, MoLEFlowModel
from anomalib_moleflow.models.moleflow.routing import TaskRouter

from .settings import ScaleSettings

#: Keys of every row of ``scale.json`` (one row per number of tasks).
ROW_KEYS: tuple[str, ...] = (
    "n_tasks", "task", "latency_ms_batch1_median", "latency_ms_batch1_min", "oracle_latency_ms_batch1_median",
    "routing_overhead_ms_batch1_median", "route_ms_batch1_median", "route_ms_interleaved_all", "route_ms_interleaved_2",
    "throughput_img_per_s", "throughput_batch", "experts_in_batch", "eval_ms_per_image",
    "routing_accuracy", "routing_accuracy_per_task", "image_AUROC_mean_routed", "image_AUROC_mean_oracle",
    "pixel_AUROC_mean_routed",
    "rss_mib", "peak_rss_mib", "params_total", "params_added", "expert_params", "state_numel",
    "checkpoint_mib", "train_seconds",
)  # fmt: skip


def timed_ms(fn: Callable[..., object], *args: object) -> float:
    """Wall milliseconds of one call ``fn(*args)``."""
    start = time.perf_counter()
    fn(*args)
    return 1000.0 * (time.perf_counter() - start)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not ``None`` (``None`` without any)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def first_tasks_router(router: TaskRouter, count: int) -> TaskRouter:
    """A copy of ``router`` that knows only its first ``count`` tasks."""
    restricted = copy.deepcopy(router)
    for key in restricted.task_keys[count:]:
        del restricted.tasks[key]
        restricted._fitted_keys.discard(key)  # noqa: SLF001
    return restricted


def interleaved_route_ms(torch_model: MoLEFlowModel, features: torch.Tensor, runs: int, warmup: int) -> tuple[float, float]:
    """Median ``route()`` ms with every seen task and with the first two only, the two timed in
    alternation on the same features, so a CPU slowed by other processes meanwhile slows both."""
    full = torch_model.router
    routers = {"all": full, "2": first_tasks_router(full, 2)}
    times: dict[str, list[float]] = {"all": [], "2": []}
    try:
        for i in range(warmup + runs):
            for name in ("all", "2") if i % 2 == 0 else ("2", "all"):
                torch_model.router = routers[name]
                ms = timed_ms(torch_model.route, features)
                if i >= warmup:
                    times[name].append(ms)
    finally:
        torch_model.router = full
    return statistics.median(times["all"]), statistics.median(times["2"])


def experts_used(pred_task: torch.Tensor) -> int:
    """How many experts scored a batch (``pred_task`` of its routed forward; unknown products aside)."""
    return int(pred_task[pred_task >= 0].unique().numel())


class ScaleRunner(ContinualRunner):
    """:class:`ContinualRunner` that measures cost and quality after each task's evaluation."""

    def __init__(self, *args: Any, settings: ScaleSettings, data_root: Path, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.data_root = data_root
        self.rows: list[dict[str, Any]] = []
        self._previous_params = 0

    def _test_images(self, task: int) -> list[Path]:
        return sorted((self.data_root / self.stream.names[task] / "test").glob("*/*.png"))

    def mixed_images(self, n_seen: int, count: int) -> tuple[torch.Tensor, list[int]]:
        """``count`` pre-processed images taken round-robin over the seen tasks' test sets, and their tasks."""
        assert self.model is not None
        per_task = [self._test_images(task) for task in range(n_seen)]
        tasks = [i % n_seen for i in range(count)]
        paths = [per_task[t][(i // n_seen) % len(per_task[t])] for i, t in enumerate(tasks)]
        images = torch.stack([read_image(p, as_tensor=True) for p in paths])
        return self.model.prepare_images(images), tasks

    def _latencies(self, torch_model: MoLEFlowModel, n_seen: int) -> dict[str, Any]:
        """Batch-1 routed and oracle latencies, their difference, and ``route()`` alone."""
        s = self.settings
        runs = max(s.latency_runs, n_seen)  # every seen task appears at least once among the timed images
        singles, tasks = self.mixed_images(n_seen, s.warmup + runs)
        for image in singles[: s.warmup]:
            torch_model(image[None])
        # routed and oracle (true expert, no router) forwards interleaved on the same image, in
        # alternating order (the first pass over an image is a little slower): their difference is
        # the routing overhead, less disturbed by other processes slowing the CPU meanwhile
        latency, oracle = [], []
        for i, (image, task) in enumerate(zip(singles[s.warmup :], tasks[s.warmup :], strict=True)):
            for routed in (True, False) if i % 2 == 0 else (False, True):
                if routed:
                    latency.append(timed_ms(torch_model, image[None]))
                else:
                    with torch_model.oracle(torch_model.task_keys[task]):
                        oracle.append(timed_ms(torch_model, image[None]))
        route_ms = route_all = route_2 = None
        if torch_model.routing_active:
            features = torch_model.extract_features(singles[:1])
            for _ in range(s.warmup):
                torch_model.route(features)
            route_ms = statistics.median(timed_ms(torch_model.route, features) for _ in range(runs))
            route_all, route_2 = interleaved_route_ms(torch_model, features, max(runs, 30), s.warmup)
        return {
            "latency_ms_batch1_median": statistics.median(latency),
            "latency_ms_batch1_min": min(latency),
            "oracle_latency_ms_batch1_median": statistics.median(oracle),
            "routing_overhead_ms_batch1_median": statistics.median(r - o for r, o in zip(latency, oracle, strict=True)),
            "route_ms_batch1_median": route_ms,
            "route_ms_interleaved_all": route_all,
            "route_ms_interleaved_2": route_2,
        }

    def _throughput(self, torch_model: MoLEFlowModel, n_seen: int) -> dict[str, Any]:
        """Images per second on one batch mixing all seen tasks; the routed forward runs each
        expert on its share, ``pred_task`` says how many experts that was."""
        s = self.settings
        batch, _ = self.mixed_images(n_seen, s.throughput_batch)
        out = torch_model(batch)  # also the warm-up
        ms = statistics.median(timed_ms(torch_model, batch) for _ in range(max(1, s.throughput_runs)))
        return {
            "throughput_img_per_s": 1000.0 * s.throughput_batch / ms,
            "throughput_batch": s.throughput_batch,
            "experts_in_batch": experts_used(out.pred_task),
        }

    def _quality(self, after_task: int) -> dict[str, Any]:
        """Routing accuracy and AUROC means over the seen tasks, from the runner's evaluation."""
        n_seen = after_task + 1
        row_of = lambda metric, mode="routed": self.results.matrix(metric, mode)[after_task][:n_seen]  # noqa: E731
        return {
            "routing_accuracy": mean(row_of("routing_accuracy")),
            "routing_accuracy_per_task": row_of("routing_accuracy"),
            "image_AUROC_mean_routed": mean(row_of("image_AUROC")),
            "image_AUROC_mean_oracle": mean(row_of("image_AUROC", "oracle")),
            "pixel_AUROC_mean_routed": mean(row_of("pixel_AUROC")),
        }

    def _sizes(self, torch_model: MoLEFlowModel, after_task: int) -> dict[str, Any]:
        """Memory now and at peak, parameters in all and added by this task, stored numbers."""
        params = sum(p.numel() for p in torch_model.parameters())
        key = torch_model.task_keys[after_task]
        out = {
            "rss_mib": current_rss_mib(),
            "peak_rss_mib": peak_rss_mib()["self"],
            "params_total": params,
            "params_added": params - self._previous_params,
            "expert_params": sum(p.numel() for p in torch_model.expert_parameters(key)),
            "state_numel": sum(v.numel() for v in torch_model.state_dict().values() if isinstance(v, torch.Tensor)),
        }
        self._previous_params = params
        return out

    @torch.no_grad()
    def measure(self, after_task: int, eval_ms: float) -> dict[str, Any]:
        """Latency, throughput, memory, parameters and quality after task ``after_task``."""
        assert self.model is not None
        torch_model, n_seen = self.model.model, after_task + 1
        was_training = self.model.training
        self.model.eval()
        speed = {**self._latencies(torch_model, n_seen), **self._throughput(torch_model, n_seen)}
        self.model.train(was_training)
        row: dict[str, Any] = {"n_tasks": n_seen, "task": self.stream.names[after_task], **speed}
        row["eval_ms_per_image"] = eval_ms
        row.update(self._quality(after_task))
        row.update(self._sizes(torch_model, after_task))
        row["checkpoint_mib"] = None  # filled in once the runner has written the checkpoint
        row["train_seconds"] = self.results.train_seconds.get(self.stream.names[after_task])
        return {key: row[key] for key in ROW_KEYS}

    def evaluate_seen(self, after_task: int) -> float:
        """The runner's evaluation of all seen tasks, then this benchmark's measurements."""
        eval_ms = super().evaluate_seen(after_task)
        row = self.measure(after_task, eval_ms)
        self.rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        return eval_ms


def run_benchmark(
    settings: ScaleSettings, work_dir: Path, model_config: MoLEFlowConfig | None = None
) -> list[dict[str, Any]]:
    """Generate the products under ``work_dir``, run the stream and return one row per task count."""
    torch.set_num_threads(settings.threads)
    data_root = work_dir / "data"
    names = make_products(
        data_root, settings.tasks, n_train=settings.train_images, n_test=settings.test_images,
        size=settings.image_px, seed=settings.seed, stream=settings.stream,
    )  # fmt: skip
    stream = TaskStream(
        names, root=str(data_root), train_batch_size=settings.train_batch_size,
        eval_batch_size=settings.eval_batch_size, num_workers=0, seed=settings.seed,
    )  # fmt: skip
    trainer = TrainerOptions(max_epochs=settings.epochs, later_task_epochs=settings.later_epochs)
    runner = ScaleRunner(
        model_config or MoLEFlowConfig(), stream, trainer,
        RunOptions(output_dir=str(work_dir / "run"), seed=settings.seed), settings=settings, data_root=data_root,
    )  # fmt: skip
    runner.run()
    for task, row in enumerate(runner.rows):
        row["checkpoint_mib"] = runner.checkpoint_path(task).stat().st_size / 2**20
        row["train_seconds"] = runner.results.train_seconds.get(names[task], row["train_seconds"])
    return runner.rows
