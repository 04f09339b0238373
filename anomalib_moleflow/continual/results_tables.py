"""Result tables of a continual run: accuracy matrices, forgetting, timing.

``R[t][i]`` is a metric on task ``i`` measured after training task ``t``
(``i <= t``). It is kept twice: ``routed`` (the model picks the expert itself)
and ``oracle`` (the true task id is given). :meth:`ContinualResults.write`
saves ``continual_metrics.json``, ``continual_matrix.csv`` and
``continual_matrix.png`` atomically; :meth:`ContinualResults.from_dict`
restores the object from the JSON for resuming a run.

``thresholds`` holds each product's fitted image (and pixel, when fitted on masks) threshold, raw
and normalised, with ``fitted_on`` naming the images that fitted it; ``image_F1`` in the matrices is
the F1 at that threshold.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from anomalib_moleflow.io import atomic_open, atomic_write_json, atomic_write_text

__all__ = ["METRIC_NAMES", "ContinualResults"]

#: Metrics kept in the matrices (keys of the dicts passed to ``record``; others are ignored).
METRIC_NAMES: tuple[str, ...] = ("image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1")
ROUTING = "routing_accuracy"
THRESHOLD_KEYS = ("image_threshold", "image_threshold_normalized", "pixel_threshold", "pixel_threshold_normalized")
Mode = Literal["routed", "oracle"]
Matrix = list[list[float | None]]


def _clean(value: Any) -> float | None:
    """``float(value)``, or ``None`` for missing / NaN / infinite values (strict JSON)."""
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


class ContinualResults:
    """Metrics of a continual run over ``tasks`` (names in training order)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = [str(name) for name in tasks]
        if len(set(self.tasks)) != len(self.tasks):
            repeated = sorted({name for name in self.tasks if self.tasks.count(name) > 1})
            msg = f"duplicate task name(s) {repeated}: task names must be unique, got {self.tasks}"
            raise ValueError(msg)
        n = len(self.tasks)
        keys = (*METRIC_NAMES, ROUTING)
        self._matrix: dict[str, dict[str, Matrix]] = {
            mode: {key: [[None] * n for _ in range(n)] for key in keys} for mode in ("routed", "oracle")
        }
        self.train_seconds: dict[str, float | None] = {}
        self.inference_ms_per_image: float | None = None
        self.resume_forced: list[str] = []
        """Settings that changed when the run was resumed with ``resume_force`` (empty: none)."""
        self.thresholds: dict[str, dict[str, Any]] = {}
        """Task name -> its thresholds (see :meth:`record_thresholds`)."""

    def _index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                msg = f"unknown task {task!r}; tasks are {self.tasks}"
                raise KeyError(msg)
            return self.tasks.index(task)
        if not 0 <= task < len(self.tasks):
            msg = f"task index {task} is outside [0, {len(self.tasks)})"
            raise IndexError(msg)
        return task

    def _cell(self, after_task: int | str, task: int | str) -> tuple[int, int]:
        t, i = self._index(after_task), self._index(task)
        if i > t:
            msg = f"task {i} ({self.tasks[i]}) cannot be evaluated after task {t}: it is not trained yet"
            raise ValueError(msg)
        return t, i

    def record(
        self,
        after_task: int | str,
        task: int | str,
        metrics: Mapping[str, Any],
        mode: Mode = "routed",
    ) -> None:
        """Store ``metrics`` of task ``task`` measured after training ``after_task``."""
        if mode not in self._matrix:
            msg = f"mode must be 'routed' or 'oracle', got {mode!r}"
            raise ValueError(msg)
        t, i = self._cell(after_task, task)
        for key in METRIC_NAMES:
            if key in metrics:
                self._matrix[mode][key][t][i] = _clean(metrics[key])

    def record_routing(self, after_task: int | str, task: int | str, accuracy: float) -> None:
        """Store the routing accuracy (fraction of task ``task``'s test images routed to its expert)."""
        t, i = self._cell(after_task, task)
        self._matrix["routed"][ROUTING][t][i] = _clean(accuracy)

    def record_timing(self, task: int | str, train_seconds: float) -> None:
        """Store the training time of ``task`` in seconds."""
        self.train_seconds[self.tasks[self._index(task)]] = _clean(train_seconds)

    def record_thresholds(self, task: int | str, values: Mapping[str, Any] | None, fitted_on: str) -> None:
        """Store ``task``'s thresholds (``image_threshold``, ``pixel_threshold`` and their
        ``*_normalized`` values; ``None`` where not fitted) and the images that fitted them."""
        name = self.tasks[self._index(task)]
        if values is None:
            self.thresholds.pop(name, None)
            return
        self.thresholds[name] = {
            **{key: _clean(values.get(key)) for key in THRESHOLD_KEYS},
            "fitted_on": str(fitted_on),
        }

    def set_inference_ms(self, ms_per_image: float) -> None:
        """Store the mean inference time per image in milliseconds."""
        self.inference_ms_per_image = _clean(ms_per_image)

    def matrix(self, metric: str, mode: Mode = "routed") -> Matrix:
        """Copy of ``R[t][i]`` for ``metric`` (``None`` where not recorded or ``i > t``)."""
        return [list(row) for row in self._matrix[mode][metric]]

    @property
    def last_after_task(self) -> int | None:
        """Index of the last task after which anything was recorded (``None`` if nothing)."""
        last = None
        for by_key in self._matrix.values():
            for rows in by_key.values():
                for t, row in enumerate(rows):
                    if any(v is not None for v in row):
                        last = t if last is None else max(last, t)
        return last

    def forgetting(self, metric: str, mode: Mode = "routed") -> float | None:
        """Mean over tasks ``i < T-1`` of ``max_{i <= t <= T-2} R[t][i] - R[T-1][i]``.

        ``T-1`` is the last task evaluated so far. ``0.0`` with a single task;
        ``None`` when no task has both a best and a final value.
        """
        last = self.last_after_task
        if last is None:
            return None
        if last == 0:
            return 0.0
        rows = self._matrix[mode][metric]
        drops = []
        for i in range(last):
            best = [rows[t][i] for t in range(i, last) if rows[t][i] is not None]
            final = rows[last][i]
            if best and final is not None:
                drops.append(max(best) - final)
        return _mean(drops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; "final" means after the last task evaluated so far."""
        last = self.last_after_task
        final: dict[str, Any] = {}
        for i, name in enumerate([] if last is None else self.tasks[: last + 1]):
            routed, oracle = self._matrix["routed"], self._matrix["oracle"]
            row: dict[str, Any] = {key: routed[key][last][i] for key in (*METRIC_NAMES, ROUTING)}
            row["oracle"] = {key: oracle[key][last][i] for key in METRIC_NAMES}
            final[name] = row
        mean: dict[str, Any] = {key: _mean([final[n][key] for n in final]) for key in (*METRIC_NAMES, ROUTING)}
        mean["oracle"] = {key: _mean([final[n]["oracle"][key] for n in final]) for key in METRIC_NAMES}
        forgetting: dict[str, Any] = {key: self.forgetting(key) for key in METRIC_NAMES}
        forgetting["oracle"] = {key: self.forgetting(key, "oracle") for key in METRIC_NAMES}
        return {
            "tasks": list(self.tasks),
            "matrix": {key: self.matrix(key) for key in (*METRIC_NAMES, ROUTING)},
            "matrix_oracle": {key: self.matrix(key, "oracle") for key in METRIC_NAMES},
            "final": final,
            "mean": mean,
            "forgetting": forgetting,
            "timing": {
                "train_seconds": {name: self.train_seconds.get(name) for name in self.tasks},
                "inference_ms_per_image": self.inference_ms_per_image,
            },
            "thresholds": {name: dict(self.thresholds[name]) for name in self.tasks if name in self.thresholds},
            **({"resume_forced": list(self.resume_forced)} if self.resume_forced else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContinualResults:
        """Restore from :meth:`to_dict` output (e.g. ``continual_metrics.json``) to resume a run."""
        results = cls(data["tasks"])
        n = len(results.tasks)
        for mode, section in (("routed", "matrix"), ("oracle", "matrix_oracle")):
            for key, rows in data.get(section, {}).items():
                if key not in results._matrix[mode]:
                    continue
                if len(rows) != n or any(len(row) != n for row in rows):
                    msg = f"{section}[{key!r}] is not a {n}x{n} matrix"
                    raise ValueError(msg)
                for t in range(n):
                    for i in range(t + 1):
                        results._matrix[mode][key][t][i] = _clean(rows[t][i])
        timing = data.get("timing", {})
        for name, seconds in timing.get("train_seconds", {}).items():
            if seconds is not None:
                results.record_timing(name, seconds)
        results.inference_ms_per_image = _clean(timing.get("inference_ms_per_image"))
        results.resume_forced = [str(item) for item in data.get("resume_forced", [])]
        for name, values in data.get("thresholds", {}).items():
            results.record_thresholds(name, values, values.get("fitted_on", ""))
        return results

    def to_csv(self) -> str:
        """Long-format CSV text: ``after_task,task,metric,mode,value`` (task names; recorded cells only)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["after_task", "task", "metric", "mode", "value"])
        for mode, by_key in self._matrix.items():
            for key, rows in by_key.items():
                for t, row in enumerate(rows):
                    for i, value in enumerate(row):
                        if value is not None:
                            writer.writerow([self.tasks[t], self.tasks[i], key, mode, repr(value)])
        return buffer.getvalue()

    def write(self, run_dir: str | Path) -> dict[str, Path]:
        """Write the JSON, CSV and heatmap PNG into ``run_dir`` (each atomically); returns their paths."""
        run_dir = Path(run_dir)
        paths = {
            "json": run_dir / "continual_metrics.json",
            "csv": run_dir / "continual_matrix.csv",
            "png": run_dir / "continual_matrix.png",
        }
        atomic_write_json(paths["json"], self.to_dict())
        atomic_write_text(paths["csv"], self.to_csv())
        self._write_heatmap(paths["png"])
        return paths

    def _write_heatmap(self, path: Path) -> None:
        """One annotated panel per metric; rows: routed (and oracle when recorded)."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        modes = ["routed"]
        if any(v is not None for rows in self._matrix["oracle"].values() for row in rows for v in row):
            modes.append("oracle")
        keys = [*METRIC_NAMES, ROUTING]
        n = len(self.tasks)
        cell = max(0.45, min(0.9, 6.0 / max(n, 1)))
        fig = Figure(figsize=(len(keys) * (n * cell + 1.6), len(modes) * (n * cell + 1.4)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(modes), len(keys), squeeze=False)
        for r, mode in enumerate(modes):
            for c, key in enumerate(keys):
                ax = axes[r][c]
                if mode == "oracle" and key == ROUTING:
                    ax.set_axis_off()
                    continue
                values = np.array([[np.nan if v is None else v for v in row] for row in self._matrix[mode][key]])
                image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
                for t in range(n):
                    for i in range(t + 1):
                        if not np.isnan(values[t, i]):
                            color = "black" if values[t, i] > 0.6 else "white"
                            ax.text(i, t, f"{values[t, i]:.3f}", ha="center", va="center", fontsize=7, color=color)
                ax.set_title(f"{key} ({mode})", fontsize=9)
                ax.set_xticks(range(n), self.tasks, rotation=90, fontsize=7)
                ax.set_yticks(range(n), self.tasks, fontsize=7)
                ax.set_xlabel("evaluated task", fontsize=8)
                ax.set_ylabel("after training", fontsize=8)
                fig.colorbar(image, ax=ax, shrink=0.8)
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
