"""The compared models, their labels, and the figures every worker reports."""

from __future__ import annotations

#: Quality metrics, computed for every model by MoLE-Flow's own evaluation helpers.
METRICS: tuple[str, ...] = ("image_AUROC", "pixel_AUROC", "pixel_AP")
LABELS: dict[str, str] = {
    "moleflow": "MoLE-Flow continual (routed, task id hidden)",
    "patchcore": "PatchCore, one model per task (task id known)",
    "fastflow": "FastFlow, one model per task (task id known)",
    "fastflow_seq": "FastFlow fine-tuned task after task",
    "patchcore_joint": "PatchCore, one memory bank grown task after task (task-free)",
    "backbone": "backbone alone (floor)",
}
MODELS: tuple[str, ...] = tuple(LABELS)
#: Figures every trained model reports (the smoke test checks them).
FIGURE_KEYS: tuple[str, ...] = (
    "final", "mean", "forgetting", "routing_accuracy", "train_seconds", "latency_ms_b1", "throughput_b32",
    "params_total", "params_added_per_task", "state_numel_total", "state_numel_added_per_task",
    "model_file_bytes", "peak_rss_mib",
)  # fmt: skip
#: Figures of the backbone-alone floor.
BACKBONE_KEYS: tuple[str, ...] = ("latency_ms_b1", "throughput_b32", "params_total", "model_file_bytes", "peak_rss_mib")


def mean_train_seconds(model: dict[str, object]) -> float | None:
    """Mean train seconds per task of one model's figures (``None`` without any)."""
    values = [v for v in (model.get("train_seconds") or {}).values() if v is not None]
    return sum(values) / len(values) if values else None
