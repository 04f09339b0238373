"""The comparison's figures: quality per task, speed, and cost per model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from reporting import pyplot, save_figure

from .names import METRICS, MODELS, mean_train_seconds

#: ``(title, figure of one model, trained models only)`` of each cost panel.
COST_PANELS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], bool], ...] = (
    ("mean train s per task", mean_train_seconds, True),
    ("stored numbers added per task (M)", lambda m: (m.get("state_numel_added_per_task") or 0) / 1e6, True),
    ("model file MiB", lambda m: (m.get("model_file_bytes") or 0) / 2**20, False),
    ("peak RSS MiB", lambda m: m.get("peak_rss_mib"), False),
)


def _quality(models: dict[str, Any], tasks: list[str], trained: list[str], path: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    groups = [*tasks, "mean"]
    width = 0.8 / max(1, len(trained))
    for ax, metric in zip(axes, METRICS, strict=True):
        for k, name in enumerate(trained):
            vals = [models[name]["final"].get(t, {}).get(metric) for t in tasks] + [models[name]["mean"].get(metric)]
            ax.bar([g + k * width for g in range(len(groups))], [v or 0 for v in vals], width, label=name)
        ax.set_xticks([g + width * (len(trained) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_title(metric)
        ax.set_ylim(0.0 if metric == "pixel_AP" else 0.5, 1.0)
    if trained:
        axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def _bars(panels: list[tuple[str, list[str], list[float]]], color: str, width: float, path: Path) -> str:
    """One bar chart per ``(title, model names, values)`` panel, side by side, ``width`` inches in all."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4), layout="constrained")
    for ax, (title, names, values) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=color)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    return save_figure(fig, path)


def plots(data: dict[str, Any], out_dir: Path) -> list[str]:
    """``compare_quality.png``, ``compare_speed.png``, ``compare_cost.png``; returns their names."""
    models, tasks = data["models"], data["meta"]["tasks"]
    trained = [n for n in MODELS if n in models and n != "backbone"]
    timed = [n for n in MODELS if n in models]
    speed = [(title, timed, [models[n].get(key) or 0 for n in timed])
             for key, title in (("latency_ms_b1", "latency ms / image, batch 1 (lower is better)"),
                                ("throughput_b32", "throughput images / s, batch 32 (higher is better)"))]  # fmt: skip
    cost = []
    for title, figure, trained_only in COST_PANELS:
        names = trained if trained_only else timed
        cost.append((title, names, [figure(models[n]) or 0 for n in names]))
    return [
        _quality(models, tasks, trained, out_dir / "compare_quality.png"),
        _bars(speed, "tab:blue", 11, out_dir / "compare_speed.png"),
        _bars(cost, "tab:orange", 16, out_dir / "compare_cost.png"),
    ]
