"""MoLE-Flow's ratios to the other models and its acceptance targets (PASS / MISS with margins).

The targets: routed batch-1 latency <= 1.5x the backbone alone, batch-32 throughput >= 2x
per-task PatchCore, train time per task <= 0.5x per-task FastFlow at equal or better pixel
AUROC, <= 1.0 M parameters added per task, mean image and pixel AUROC within 0.5 points of
per-task PatchCore and above per-task FastFlow.
"""

from __future__ import annotations

from typing import Any

from .names import METRICS, mean_train_seconds


def points(gap: float | None) -> str:
    """An AUROC difference in percentage points (``+0.53 points``), ``n/a`` without one."""
    return "n/a" if gap is None else f"{100 * gap:+.2f} points"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratios(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """MoLE-Flow against the others, from figures measured in this run."""
    mf = models.get("moleflow", {})
    get = lambda name, key: models.get(name, {}).get(key)
    out: dict[str, Any] = {
        "moleflow_latency_over_backbone": _div(get("moleflow", "latency_ms_b1"), get("backbone", "latency_ms_b1")),
        "moleflow_throughput_over_patchcore": _div(get("moleflow", "throughput_b32"), get("patchcore", "throughput_b32")),
        "moleflow_throughput_over_backbone": _div(get("moleflow", "throughput_b32"), get("backbone", "throughput_b32")),
        "moleflow_train_per_task_over_fastflow": _div(mean_train_seconds(mf), mean_train_seconds(models.get("fastflow", {}))),
        "moleflow_params_added_per_task": mf.get("params_added_per_task"),
        "gaps": {},
    }
    for other in ("patchcore", "fastflow", "fastflow_seq", "patchcore_joint"):
        if other in models and mf:
            out["gaps"][other] = {k: _sub(mf["mean"].get(k), models[other]["mean"].get(k)) for k in METRICS}
    return out


def _target(name: str, value: float | None, ok: bool | None, text: str, margin: float | None, unit: str) -> dict[str, Any]:
    verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
    return {"target": name, "requirement": text, "value": value, "verdict": verdict,
            "margin": margin, "unit": unit}


def targets(models: dict[str, dict[str, Any]], r: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance targets, each with the measured value, PASS/MISS and the margin (+ = to spare)."""
    out = []
    lat = r["moleflow_latency_over_backbone"]
    out.append(_target("routed latency", lat, None if lat is None else lat <= 1.5,
                       "MoLE-Flow batch-1 latency <= 1.5x backbone alone", None if lat is None else 1.5 - lat, "x"))
    thr = r["moleflow_throughput_over_patchcore"]
    out.append(_target("throughput", thr, None if thr is None else thr >= 2.0,
                       "MoLE-Flow batch-32 throughput >= 2x per-task PatchCore", None if thr is None else thr - 2.0, "x"))
    tr = r["moleflow_train_per_task_over_fastflow"]
    pix = r["gaps"].get("fastflow", {}).get("pixel_AUROC")
    ok = None if tr is None or pix is None else (tr <= 0.5 and pix >= 0)
    out.append(_target("train time", tr, ok, "MoLE-Flow train s per task <= 0.5x per-task FastFlow's, "
                       f"at equal or better pixel AUROC (gap {points(pix)})", None if tr is None else 0.5 - tr, "x"))
    par = r["moleflow_params_added_per_task"]
    out.append(_target("params added per task", par, None if par is None else par <= 1.0e6,
                       "MoLE-Flow parameters added per task <= 1.0 M", None if par is None else 1.0e6 - par, "params"))
    for metric in ("image_AUROC", "pixel_AUROC"):
        gap = r["gaps"].get("patchcore", {}).get(metric)
        out.append(_target(f"mean {metric} vs PatchCore", gap, None if gap is None else gap >= -0.005,
                           f"within 0.5 points of per-task PatchCore ({metric}, MoLE-Flow minus PatchCore >= -0.005)",
                           None if gap is None else gap + 0.005, "AUROC"))
        gap = r["gaps"].get("fastflow", {}).get(metric)
        out.append(_target(f"mean {metric} vs FastFlow", gap, None if gap is None else gap > 0,
                           f"above per-task FastFlow ({metric}, MoLE-Flow minus FastFlow > 0)", gap, "AUROC"))
    return out
