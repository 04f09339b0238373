"""Scale benchmark: how MoLE-Flow's cost grows as the continual stream grows from 1 to N tasks.

    python benchmarks/scale.py --tasks 15

Generates N visually distinct synthetic MVTec-layout products (``benchmarks/synthetic_products.py``)
in a temporary folder, runs MoLE-Flow continually over them with the default model
configuration (``MoLEFlowConfig()``: EfficientNet-Lite0, 256 px) and, after each task t, records:

* routed inference latency per image at batch 1 (median over images of all seen tasks,
  after warm-ups), the router's own share of it, and throughput at batch 32;
* routing accuracy and image AUROC (routed and oracle), averaged over the seen tasks;
* current and peak resident memory of this process;
* model parameters (total, added by task t), checkpoint size, and task t's train time.

Writes ``benchmarks/results/scale.{json,md,png}`` with the command. Few images and epochs
per task keep the run short on a CPU; latency is that of the real model, quality is not.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (HERE, REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from synthetic_products import PRODUCTS, make_products  # noqa: E402

from anomalib_moleflow.continual.runner import ContinualRunner, RunOptions, TrainerOptions  # noqa: E402
from anomalib_moleflow.continual.task_stream import TaskStream  # noqa: E402
from anomalib_moleflow.models.moleflow import MoLEFlowConfig  # noqa: E402

RESULTS = HERE / "results"
#: Keys of every row of ``scale.json`` (one row per number of tasks).
ROW_KEYS: tuple[str, ...] = (
    "n_tasks", "task", "latency_ms_batch1_median", "latency_ms_batch1_min", "oracle_latency_ms_batch1_median",
    "routing_overhead_ms_batch1_median", "route_ms_batch1_median",
    "throughput_img_per_s", "throughput_batch", "experts_in_batch", "eval_ms_per_image",
    "routing_accuracy", "routing_accuracy_per_task", "image_AUROC_mean_routed", "image_AUROC_mean_oracle",
    "pixel_AUROC_mean_routed",
    "rss_mib", "peak_rss_mib", "params_total", "params_added", "expert_params", "state_numel",
    "checkpoint_mib", "train_seconds",
)  # fmt: skip
FLAT_TOLERANCE = 0.25
"""A ratio within ``[1 / (1 + tol), 1 + tol]`` counts as flat (short CPU runs are noisy)."""


@dataclass
class ScaleSettings:
    """What the benchmark runs (all command-line options)."""

    tasks: int = 15
    train_images: int = 32
    test_images: int = 10
    epochs: int = 3
    later_epochs: int | None = None
    image_px: int = 256
    train_batch_size: int = 16
    eval_batch_size: int = 16
    warmup: int = 3
    latency_runs: int = 20
    throughput_batch: int = 32
    throughput_runs: int = 3
    threads: int = 1
    seed: int = 0


# ----------------------------------------------------------------------------- measurements
def memory_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process in MiB (``/proc/self/status``).

    Before reading, garbage is collected and glibc is asked to return freed heap memory to
    the system (``malloc_trim``); otherwise "current" mostly shows what the allocator keeps
    cached from the largest forward so far.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    current = peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
    return (current if current is not None else float("nan")), peak


def _read_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` float image in ``[0, 1]``, as anomalib's datasets deliver it."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def _timed(fn: Any, *args: Any) -> float:  # noqa: ANN401 - any callable and its arguments
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


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

    def _mixed_images(self, n_seen: int, count: int) -> tuple[torch.Tensor, list[int]]:
        """``count`` pre-processed images taken round-robin over the seen tasks' test sets, and their tasks."""
        per_task = [self._test_images(task) for task in range(n_seen)]
        tasks = [i % n_seen for i in range(count)]
        paths = [per_task[t][(i // n_seen) % len(per_task[t])] for i, t in enumerate(tasks)]
        images = torch.stack([_read_image(p) for p in paths])
        assert self.model is not None
        if self.model.pre_processor is not None:
            images = self.model.pre_processor.transform(images)
        return images, tasks

    @torch.no_grad()
    def measure(self, after_task: int, eval_ms: float) -> dict[str, Any]:
        """Latency, throughput, memory, parameters and quality after task ``after_task``."""
        assert self.model is not None
        s, torch_model, n_seen = self.settings, self.model.model, after_task + 1
        was_training = self.model.training
        self.model.eval()
        # batch 1: every seen task appears at least once among the timed images
        runs = max(s.latency_runs, n_seen)
        singles, tasks = self._mixed_images(n_seen, s.warmup + runs)
        for image in singles[: s.warmup]:
            torch_model(image[None])
        # routed and oracle (true expert, no router) forwards interleaved on the same image, in
        # alternating order (the first pass over an image is a little slower): their difference is
        # the routing overhead, less disturbed by other jobs slowing the machine meanwhile
        latency, oracle = [], []
        for i, (image, task) in enumerate(zip(singles[s.warmup :], tasks[s.warmup :], strict=True)):
            for routed in (True, False) if i % 2 == 0 else (False, True):
                if routed:
                    latency.append(1000.0 * _timed(torch_model, image[None]))
                else:
                    with torch_model.oracle(torch_model.task_keys[task]):
                        oracle.append(1000.0 * _timed(torch_model, image[None]))
        route_ms = None
        if torch_model.routing_active:
            features = torch_model.extract_features(singles[:1])
            for _ in range(s.warmup):
                torch_model.route(features)
            route_ms = statistics.median(1000.0 * _timed(torch_model.route, features) for _ in range(runs))
        # batch 32, images of all seen tasks mixed: the routed forward runs each expert on its share
        batch, _ = self._mixed_images(n_seen, s.throughput_batch)
        torch_model(batch)  # warm-up
        seconds = statistics.median(_timed(torch_model, batch) for _ in range(max(1, s.throughput_runs)))
        experts = int(torch_model.last_route.unique().numel()) if torch_model.routing_active else 1
        del singles, batch
        self.model.train(was_training)

        rss, peak = memory_mib()
        params = sum(p.numel() for p in torch_model.parameters())
        key = torch_model.task_keys[after_task]
        row_of = lambda metric, mode="routed": self.results.matrix(metric, mode)[after_task][:n_seen]  # noqa: E731
        row = {
            "n_tasks": n_seen,
            "task": self.stream.names[after_task],
            "latency_ms_batch1_median": statistics.median(latency),
            "latency_ms_batch1_min": min(latency),
            "oracle_latency_ms_batch1_median": statistics.median(oracle),
            "routing_overhead_ms_batch1_median": statistics.median(r - o for r, o in zip(latency, oracle, strict=True)),
            "route_ms_batch1_median": route_ms,
            "throughput_img_per_s": s.throughput_batch / seconds,
            "throughput_batch": s.throughput_batch,
            "experts_in_batch": experts,
            "eval_ms_per_image": eval_ms,
            "routing_accuracy": _mean(row_of("routing_accuracy")),
            "routing_accuracy_per_task": row_of("routing_accuracy"),
            "image_AUROC_mean_routed": _mean(row_of("image_AUROC")),
            "image_AUROC_mean_oracle": _mean(row_of("image_AUROC", "oracle")),
            "pixel_AUROC_mean_routed": _mean(row_of("pixel_AUROC")),
            "rss_mib": rss,
            "peak_rss_mib": peak,
            "params_total": params,
            "params_added": params - self._previous_params,
            "expert_params": sum(p.numel() for p in torch_model.expert_parameters(key)),
            "state_numel": sum(v.numel() for v in torch_model.state_dict().values()),
            "checkpoint_mib": None,  # filled in once the runner has written the checkpoint
            "train_seconds": self.results.train_seconds.get(self.stream.names[after_task]),
        }
        self._previous_params = params
        return row

    def evaluate_seen(self, after_task: int) -> float:
        """The runner's evaluation of all seen tasks, then this benchmark's measurements."""
        eval_ms = super().evaluate_seen(after_task)
        row = self.measure(after_task, eval_ms)
        self.rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        return eval_ms


# ----------------------------------------------------------------------------- the run
def run_benchmark(
    settings: ScaleSettings, work_dir: Path, model_config: MoLEFlowConfig | None = None
) -> list[dict[str, Any]]:
    """Generate the products under ``work_dir``, run the stream and return one row per task count."""
    torch.set_num_threads(settings.threads)
    config = model_config or MoLEFlowConfig()
    data_root = work_dir / "data"
    names = make_products(
        data_root, settings.tasks, n_train=settings.train_images, n_test=settings.test_images,
        size=settings.image_px, seed=settings.seed,
    )  # fmt: skip
    stream = TaskStream(
        names, root=str(data_root), train_batch_size=settings.train_batch_size,
        eval_batch_size=settings.eval_batch_size, num_workers=0, seed=settings.seed,
    )  # fmt: skip
    trainer = TrainerOptions(max_epochs=settings.epochs, later_task_epochs=settings.later_epochs)
    runner = ScaleRunner(
        config, stream, trainer, RunOptions(output_dir=str(work_dir / "run"), seed=settings.seed),
        settings=settings, data_root=data_root,
    )  # fmt: skip
    runner.run()
    for task, row in enumerate(runner.rows):
        row["checkpoint_mib"] = runner.checkpoint_path(task).stat().st_size / 2**20
        row["train_seconds"] = runner.results.train_seconds.get(names[task], row["train_seconds"])
    return runner.rows


# ----------------------------------------------------------------------------- reporting
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _flat(ratio: float | None) -> bool | None:
    return None if ratio is None else 1 / (1 + FLAT_TOLERANCE) <= ratio <= 1 + FLAT_TOLERANCE


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the last task count against the first ones, and whether each stays flat."""
    first, last = rows[0], rows[-1]
    second = rows[1] if len(rows) > 1 else None
    later = rows[1:]  # task 0 also trains the shared flow: compare later tasks among themselves
    tail = later[-min(3, len(later) - 1) :] if len(later) > 1 else []
    train_last = _mean([r["train_seconds"] for r in tail]) if tail else None
    added = [r["params_added"] for r in later]
    out: dict[str, Any] = {
        "n_tasks": last["n_tasks"],
        "latency_ratio_last_vs_1": _ratio(last["latency_ms_batch1_median"], first["latency_ms_batch1_median"]),
        "latency_ratio_last_vs_2": _ratio(last["latency_ms_batch1_median"], second["latency_ms_batch1_median"])
        if second
        else None,
        "route_ms_ratio_last_vs_2": _ratio(last["route_ms_batch1_median"], second["route_ms_batch1_median"])
        if second
        else None,
        "throughput_ratio_last_vs_1": _ratio(last["throughput_img_per_s"], first["throughput_img_per_s"]),
        "train_seconds_task1": second["train_seconds"] if second else None,
        "train_seconds_last_tasks_mean": train_last,
        "train_last_tasks": [r["task"] for r in tail],
        "train_ratio_last_vs_task1": _ratio(train_last, second["train_seconds"]) if second else None,
        "params_added_per_later_task": sorted(set(added)),
        "checkpoint_mib_per_later_task": (last["checkpoint_mib"] - first["checkpoint_mib"]) / (len(rows) - 1)
        if second
        else None,
        "rss_mib_per_later_task": (last["rss_mib"] - first["rss_mib"]) / (len(rows) - 1) if second else None,
    }
    for key in ("latency_ratio_last_vs_1", "latency_ratio_last_vs_2", "throughput_ratio_last_vs_1",
                "train_ratio_last_vs_task1"):  # fmt: skip
        out[key.replace("ratio", "flat")] = _flat(out[key])
    return out


def _fmt(value: Any, digits: int = 1) -> str:  # noqa: ANN401 - numbers or None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _verdict(flat: bool | None, ratio: float | None) -> str:
    if flat is None or ratio is None:
        return "n/a"
    return "flat" if flat else ("cost GROWS" if ratio > 1 else "cost drops")


def markdown(result: dict[str, Any]) -> str:
    """The results file ``scale.md``."""
    meta, rows, summ = result["meta"], result["rows"], result["summary"]
    n = summ["n_tasks"]
    lines = [
        f"# MoLE-Flow scale benchmark: 1 to {n} tasks",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}, {meta['threads']} torch thread(s); "
        f"whole run {meta['wall_minutes']:.1f} min).",
        "",
        f"Model: {meta['model_config_note']}. Data: {n} synthetic products (`benchmarks/synthetic_products.py`), "
        f"{meta['settings']['train_images']} training and {meta['settings']['test_images']} test images each "
        f"({meta['settings']['image_px']} px), {meta['settings']['epochs']} epoch(s) per task. Quality numbers "
        "(AUROC) of such short runs say little; cost and routing are the point.",
        "",
        "Latency: routed `MoLEFlowModel.forward` (backbone, router, expert flow, anomaly map) on one "
        "pre-processed image, median over images of all seen tasks after warm-ups; oracle = the same image "
        "through its true expert without the router, timed right after it (routing overhead = median of the "
        "differences, which other jobs on the machine disturb far less than the latencies); router = "
        f"`route()` alone. Throughput: batch of {meta['settings']['throughput_batch']} images mixed round-robin "
        "over all seen tasks. Memory: RSS of this process (peak includes the batch forward). Checkpoint: "
        "the runner's `task_<t>.ckpt`.",
        "",
        "| tasks | latency ms (b=1) | oracle ms (b=1) | routing overhead ms | router ms | img/s (b=32) | "
        "experts in batch | routing acc | img AUROC routed | img AUROC oracle | RSS MiB | peak RSS MiB | "
        "params total | params added | ckpt MiB | train s |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        lines.append(
            f"| {r['n_tasks']} | {_fmt(r['latency_ms_batch1_median'])} | "
            f"{_fmt(r['oracle_latency_ms_batch1_median'])} | "
            f"{_fmt(r['routing_overhead_ms_batch1_median'], 2)} | {_fmt(r['route_ms_batch1_median'], 3)} | "
            f"{_fmt(r['throughput_img_per_s'], 2)} | {r['experts_in_batch']} | {_fmt(r['routing_accuracy'], 3)} | "
            f"{_fmt(r['image_AUROC_mean_routed'], 3)} | {_fmt(r['image_AUROC_mean_oracle'], 3)} | "
            f"{_fmt(r['rss_mib'], 0)} | {_fmt(r['peak_rss_mib'], 0)} | {_fmt(r['params_total'])} | "
            f"{_fmt(r['params_added'])} | {_fmt(r['checkpoint_mib'], 2)} | {_fmt(r['train_seconds'])} |"
        )
    first, last = rows[0], rows[-1]
    lines += ["", "## Does the cost per task stay flat?", ""]
    if len(rows) < 2:
        lines.append("Only one task was run: nothing to compare.")
        return "\n".join(lines) + "\n"
    second = rows[1]
    tol = f"{FLAT_TOLERANCE:.0%}"

    def verdict(what: str, which: str, inverse: bool = False) -> str:
        ratio = summ[f"{what}_ratio_{which}"]
        if inverse and ratio:
            ratio = 1 / ratio  # throughput: a lower rate is a higher cost
        return _verdict(summ[f"{what}_flat_{which}"], ratio)

    lines += [
        f"A ratio counts as flat within +-{tol} (few images, short timings).",
        "",
        f"- **Latency, batch 1** ({verdict('latency', 'last_vs_1')} vs 1 task, "
        f"{verdict('latency', 'last_vs_2')} vs 2 tasks): {_fmt(last['latency_ms_batch1_median'])} ms at "
        f"{n} tasks vs {_fmt(first['latency_ms_batch1_median'])} ms at 1 task "
        f"(x{_fmt(summ['latency_ratio_last_vs_1'], 2)}) and {_fmt(second['latency_ms_batch1_median'])} ms at "
        f"2 tasks (x{_fmt(summ['latency_ratio_last_vs_2'], 2)}). With one task the router is off; from two "
        "tasks on each image pays the router once and runs exactly one expert, so batch-1 latency does not "
        "depend on the number of experts apart from the router. Routing overhead per image (routed - oracle): "
        f"{_fmt(second['routing_overhead_ms_batch1_median'], 2)} ms at 2 tasks, "
        f"{_fmt(last['routing_overhead_ms_batch1_median'], 2)} ms at {n}; the oracle latency goes "
        f"{_fmt(first['oracle_latency_ms_batch1_median'])} -> {_fmt(last['oracle_latency_ms_batch1_median'])} ms "
        "(a change there is the machine, not the model).",
        f"- **Router** (grows linearly, stays small): `route()` takes {_fmt(second['route_ms_batch1_median'], 3)} ms "
        f"at 2 tasks and {_fmt(last['route_ms_batch1_median'], 3)} ms at {n} "
        f"(x{_fmt(summ['route_ms_ratio_last_vs_2'], 2)}). The prototype router computes a Mahalanobis "
        "distance to every task's prototype, so its cost is linear in the number of tasks, but it works on "
        "pooled feature vectors and is a small share of the latency.",
        f"- **Throughput, batch {last['throughput_batch']}** ({verdict('throughput', 'last_vs_1', inverse=True)}): "
        f"{_fmt(last['throughput_img_per_s'], 2)} img/s at {n} tasks vs {_fmt(first['throughput_img_per_s'], 2)} "
        f"at 1 task (x{_fmt(summ['throughput_ratio_last_vs_1'], 2)}); the last batch was split among "
        f"{last['experts_in_batch']} experts. The routed forward groups a batch's images by expert and runs "
        "each expert's flow on its group, so a batch mixing many products runs many small flow passes "
        "(less efficient than one large one) while the backbone still runs once on the whole batch.",
    ]
    misrouted = [
        f"{name} {acc:.2f}"
        for name, acc in zip(meta["tasks"], last["routing_accuracy_per_task"], strict=False)
        if acc is not None and acc < 1
    ]
    lines.append(
        f"- **Routing**: {_fmt(last['routing_accuracy'], 3)} of all seen tasks' test images go to their own expert "
        f"at {n} tasks ({_fmt(second['routing_accuracy'], 3)} at 2). "
        + (f"Tasks routed imperfectly at the end: {', '.join(misrouted)}. " if misrouted else "Every task perfectly. ")
        + "The per-task values after each task are `routing_accuracy_per_task` in the JSON."
    )
    if summ["train_ratio_last_vs_task1"] is not None:
        lines.append(
            f"- **Train time per task** ({verdict('train', 'last_vs_task1')}): task 1 took "
            f"{_fmt(summ['train_seconds_task1'])} s, the last tasks ({', '.join(summ['train_last_tasks'])}) "
            f"{_fmt(summ['train_seconds_last_tasks_mean'])} s on average "
            f"(x{_fmt(summ['train_ratio_last_vs_task1'], 2)}). Task 0 ({_fmt(first['train_seconds'])} s) also trains "
            "the shared flow, mixer and context, so it is not compared. A later task trains only its own "
            "expert on cached features of its own images; nothing in it depends on earlier tasks."
        )
    else:
        lines.append("- **Train time per task**: needs at least 3 tasks to compare later tasks.")
    lines += [
        f"- **Parameters**: each later task adds {', '.join(_fmt(a) for a in summ['params_added_per_later_task'])} "
        f"parameters (its LoRA, task bias, whitening adapter and DIA); {_fmt(last['params_total'])} in all at "
        f"{n} tasks vs {_fmt(first['params_total'])} at 1. Checkpoints grow by "
        f"{_fmt(summ['checkpoint_mib_per_later_task'], 2)} MiB per task (linear, by design).",
        f"- **Memory**: current RSS grows {_fmt(summ['rss_mib_per_later_task'], 1)} MiB per task on average "
        f"({_fmt(first['rss_mib'], 0)} -> {_fmt(last['rss_mib'], 0)} MiB); the peak "
        f"({_fmt(last['peak_rss_mib'], 0)} MiB) is set by the batch forward and training activations, not by "
        "the experts. Allocator caching makes single RSS readings noisy.",
        "- **Evaluation** (not in the train times above): the runner re-evaluates every seen task after each "
        "task, so that step grows linearly per task (quadratically over the run); a deployment does not do it.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency, throughput, train time, routing accuracy, memory and checkpoint size vs tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["n_tasks"] for r in rows]
    nan = float("nan")
    get = lambda key: [nan if r[key] is None else r[key] for r in rows]  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    panels = [
        ("latency ms / image (batch 1)", [("routed median", "latency_ms_batch1_median"),
                                          ("oracle median", "oracle_latency_ms_batch1_median"),
                                          ("routed min", "latency_ms_batch1_min")]),
        (f"throughput img/s (batch {rows[0]['throughput_batch']})", [("mixed tasks", "throughput_img_per_s")]),
        ("train time of task t (s)", [("train", "train_seconds")]),
        ("routing / image AUROC (mean over seen)", [("routing acc", "routing_accuracy"),
                                                    ("AUROC routed", "image_AUROC_mean_routed"),
                                                    ("AUROC oracle", "image_AUROC_mean_oracle")]),
        ("memory (MiB)", [("RSS", "rss_mib"), ("peak RSS", "peak_rss_mib")]),
        ("checkpoint MiB", [("checkpoint", "checkpoint_mib")]),
    ]  # fmt: skip
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        for label, key in series:
            ax.plot(x, get(key), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("number of tasks")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    route_ax = axes.flat[0].twinx()
    route_ax.plot(x, get("routing_overhead_ms_batch1_median"), color="gray", linestyle="--", marker=".")
    route_ax.set_ylabel("routing overhead ms (routed - oracle)", color="gray")
    fig.suptitle(result["meta"]["command"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(result: dict[str, Any], output_dir: Path) -> list[Path]:
    """Write ``scale.json``, ``scale.md`` and ``scale.png`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "scale.json", output_dir / "scale.md", output_dir / "scale.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: :class:`ScaleSettings`)."""
    d = ScaleSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=d.tasks, help=f"number of products, 1..{len(PRODUCTS)}")
    p.add_argument("--train-images", type=int, default=d.train_images, help="normal training images per task")
    p.add_argument("--test-images", type=int, default=d.test_images, help="test images per task (half defective)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per task")
    p.add_argument("--later-epochs", type=int, default=d.later_epochs, help="epochs of tasks after the first")
    p.add_argument("--image-px", type=int, default=d.image_px, help="side of the generated images")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed forwards before timing")
    p.add_argument("--latency-runs", type=int, default=d.latency_runs, help="timed batch-1 images (>= tasks seen)")
    p.add_argument("--throughput-batch", type=int, default=d.throughput_batch)
    p.add_argument("--throughput-runs", type=int, default=d.throughput_runs, help="timed batches (median)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=str(RESULTS), help="where scale.{json,md,png} go")
    p.add_argument("--work-dir", default=None, help="keep data and checkpoints here (default: a temp folder)")
    p.add_argument("--model-config", default=None, help="JSON of MoLEFlowConfig fields to override (tests)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results; returns what ``scale.json`` holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = ScaleSettings(**{k: getattr(args, k) for k in asdict(ScaleSettings())})
    overrides = json.loads(args.model_config) if args.model_config else {}
    config = MoLEFlowConfig(**overrides)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    if args.work_dir:
        work = Path(args.work_dir)
        if (work / "run").exists():
            raise SystemExit(f"'{work / 'run'}' exists: a benchmark measures a fresh run; choose another --work-dir")
        rows = run_benchmark(settings, work, config)
    else:
        with tempfile.TemporaryDirectory(prefix="moleflow_scale_") as tmp:
            rows = run_benchmark(settings, Path(tmp), config)
    result: dict[str, Any] = {
        "meta": {
            "command": "python benchmarks/scale.py " + shlex.join(argv),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
            "threads": settings.threads,
            "torch": torch.__version__,
            "wall_minutes": (time.perf_counter() - start) / 60,
            "settings": asdict(settings),
            "model_config": config.to_dict(),
            "tasks": list(PRODUCTS)[: settings.tasks],
            "model_config_note": "MoLEFlowConfig() defaults"
            if not overrides
            else f"MoLEFlowConfig() with {json.dumps(overrides)}",
        },
        "rows": rows,
    }
    result["summary"] = summarize(rows)
    for path in write_results(result, Path(args.output_dir)):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
