"""MoLE-Flow continual worker (the project's own CLI run, then its final checkpoint) and the backbone floor."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from anomalib_moleflow.backbones import create_feature_extractor
from anomalib_moleflow.continual.runner import build_model
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig

from .common import Spec, numel, peak_rss_mib, saved_bytes, speed, timing_batch
from .names import METRICS


def run_continual_cli(spec: Spec) -> float:
    """``python -m anomalib_moleflow continual ...`` (``spec.moleflow_cmd``) in a subprocess; wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *spec.moleflow_cmd], check=False)
    if proc.returncode != 0:
        msg = f"MoLE-Flow continual run failed (exit {proc.returncode}): {' '.join(spec.moleflow_cmd)}"
        raise RuntimeError(msg)
    return time.perf_counter() - start


def final_checkpoint(run_dir: Path) -> Path:
    """The last task's checkpoint of a finished continual run."""
    found = sorted((run_dir / "checkpoints").glob("task_*.ckpt"))
    if not found:
        msg = f"no checkpoint in {run_dir / 'checkpoints'}"
        raise FileNotFoundError(msg)
    return found[-1]


def params_per_task(config: MoLEFlowConfig, n_tasks: int, buffers: bool = False) -> list[int]:
    """Parameter counts (with ``buffers``: stored numbers, e.g. the per-task router, global-score
    and position-Gaussian statistics) of a fresh MoLE-Flow after 0, 1, ..., ``n_tasks`` experts."""
    model = build_model(config)
    counts = [numel(model.model, buffers)]
    for _ in range(n_tasks):
        model.add_task()
        counts.append(numel(model.model, buffers))
    return counts


def _added_per_task(counts: list[int]) -> float:
    """Later tasks add one expert each (the first task also creates the shared flow)."""
    return (counts[-1] - counts[1]) / (len(counts) - 2) if len(counts) > 2 else counts[1] - counts[0]


def run_moleflow(spec: Spec) -> dict[str, Any]:
    """Continual MoLE-Flow: quality from its ``continual_metrics.json``, costs from its final checkpoint."""
    run_dir = Path(spec.moleflow_dir)
    wall = run_continual_cli(spec)
    train_peak = peak_rss_mib()  # the CLI child has been waited for: its peak is in RUSAGE_CHILDREN
    metrics = json.loads((run_dir / "continual_metrics.json").read_text())
    ckpt = final_checkpoint(run_dir)
    model = MoLEFlow.from_checkpoint(ckpt)
    torch_model = model.model
    stream = spec.stream()
    images = timing_batch(model, stream)
    final = {
        name: {key: metrics["final"][name][key] for key in (*METRICS, "routing_accuracy")} for name in metrics["tasks"]
    }
    counts = params_per_task(model.config, len(spec.tasks))
    stored = params_per_task(model.config, len(spec.tasks), buffers=True)
    extractor = getattr(torch_model.feature_extractor, "backbone", None)
    backbone = numel(extractor) if extractor is not None else None
    out: dict[str, Any] = {
        "name": "moleflow", "kind": "continual", "final": final,
        "mean": {key: metrics["mean"][key] for key in (*METRICS, "routing_accuracy")},
        "forgetting": {key: metrics["forgetting"][key] for key in METRICS},
        "matrix": {key: metrics["matrix"][key] for key in METRICS},
        "routing_accuracy": metrics["mean"]["routing_accuracy"],
        "train_seconds": metrics["timing"]["train_seconds"],
        "eval_ms_per_image_in_run": metrics["timing"]["inference_ms_per_image"],
        "continual_wall_seconds": wall,
        **speed(lambda x: torch_model(x), images, spec),
        "params_total": numel(torch_model),
        "params_backbone": backbone,
        "params_per_task_count": counts,
        "params_added_first_task": counts[1] - counts[0],
        "params_added_per_task": _added_per_task(counts),
        "state_numel_added_per_task": _added_per_task(stored),
        "state_numel_total": numel(torch_model, buffers=True),
        "model_file_bytes": saved_bytes(model.state_dict()),
        "checkpoint_bytes": ckpt.stat().st_size,
        "peak_rss_mib_train": train_peak,
        "settings": {"continual_command": "python " + " ".join(spec.moleflow_cmd), "checkpoint": str(ckpt)},
    }
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_backbone(spec: Spec) -> dict[str, Any]:
    """The frozen backbone alone (timm ``features_only``, same stages): the floor every model shares."""
    from .baselines import (
        make_patchcore,  # any model with the shared pre-processor will do
    )

    extractor = create_feature_extractor(spec.backbone, tuple(spec.out_indices))
    images = timing_batch(make_patchcore(spec), spec.stream())
    out: dict[str, Any] = {
        "name": "backbone", "kind": "floor",
        **speed(lambda x: extractor(x), images, spec),
        "params_total": numel(extractor),
        "state_numel_total": numel(extractor, buffers=True),
        "model_file_bytes": saved_bytes(extractor.state_dict()),
        "settings": {"backbone": spec.backbone, "out_indices": list(spec.out_indices), "image_size": spec.image_size},
    }
    out["peak_rss_mib"] = peak_rss_mib()
    return out
