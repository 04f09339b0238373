"""The scale benchmark's figure ``scale.png``: six panels against the number of tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reporting import pyplot, save_figure

#: ``(title, [(label, row key), ...])`` of each panel, left to right, top to bottom.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("latency ms / image (batch 1)", (("routed median", "latency_ms_batch1_median"),
                                      ("oracle median", "oracle_latency_ms_batch1_median"),
                                      ("routed min", "latency_ms_batch1_min"))),
    ("throughput img/s (batch {batch})", (("mixed tasks", "throughput_img_per_s"),)),
    ("train time of task t (s)", (("train", "train_seconds"),)),
    ("routing / image AUROC (mean over seen)", (("routing acc", "routing_accuracy"),
                                                ("AUROC routed", "image_AUROC_mean_routed"),
                                                ("AUROC oracle", "image_AUROC_mean_oracle"))),
    ("memory (MiB)", (("RSS", "rss_mib"), ("peak RSS", "peak_rss_mib"))),
    ("checkpoint MiB", (("checkpoint", "checkpoint_mib"),)),
)  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> str:
    """Latency, throughput, train time, routing accuracy, memory and checkpoint size vs tasks."""
    plt = pyplot()
    rows = result["rows"]
    x = [r["n_tasks"] for r in rows]
    series_of = lambda key: [float("nan") if r[key] is None else r[key] for r in rows]  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, series) in zip(axes.flat, PANELS, strict=True):
        for label, key in series:
            ax.plot(x, series_of(key), marker="o", label=label)
        ax.set_title(title.format(batch=rows[0]["throughput_batch"]))
        ax.set_xlabel("number of tasks")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    route_ax = axes.flat[0].twinx()
    route_ax.plot(x, series_of("routing_overhead_ms_batch1_median"), color="gray", linestyle="--", marker=".")
    route_ax.set_ylabel("routing overhead ms (routed - oracle)", color="gray")
    fig.suptitle(result["meta"]["command"], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
