"""Ratios to MoLE-Flow, the issue's targets, the markdown report and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
)
BACKBONE_KEYS: tuple[str, ...] = ("latency_ms_b1", "throughput_b32", "params_total", "model_file_bytes", "peak_rss_mib")


def _mean_train(model: dict[str, Any]) -> float | None:
    values = [v for v in model.get("train_seconds", {}).values() if v is not None]
    return sum(values) / len(values) if values else None


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
        "moleflow_train_per_task_over_fastflow": _div(_mean_train(mf), _mean_train(models.get("fastflow", {}))),
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
    """The issue's targets, each with the measured value, PASS/MISS and the margin (+ = to spare)."""
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
                       f"at equal or better pixel AUROC (gap {_pts(pix)})", None if tr is None else 0.5 - tr, "x"))
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


def _pts(gap: float | None) -> str:
    return "n/a" if gap is None else f"{100 * gap:+.2f} points"


def _f(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3f} M" if abs(value) >= 1e4 else f"{value:.0f}"


def _margin(t: dict[str, Any]) -> str:
    m = t["margin"]
    if m is None:
        return "-"
    if t["unit"] == "AUROC":
        text = f"{100 * abs(m):.2f} points"
    elif t["unit"] == "params":
        text = f"{abs(m) / 1e6:.3f} M"
    else:
        text = f"{abs(m):.2f}x"
    return f"{text} to spare" if m >= 0 else f"short by {text}"


def markdown(data: dict[str, Any]) -> str:
    """The report: settings, quality per task, costs, ratios, targets."""
    meta, models, tasks = data["meta"], data["models"], data["meta"]["tasks"]
    lines = [
        "# MoLE-Flow against anomalib PatchCore and FastFlow (same machine, data, backbone, input size)",
        "",
        f"Command: `{meta['command']}`",
        "",
        (f"{meta['date']}, {meta['machine']}, torch threads {meta['threads']}. Tasks: {' -> '.join(tasks)}. "
        f"Backbone `{meta['backbone']}` stages {meta['layers']} (timm out_indices {meta['out_indices']}), "
        f"input {meta['image_size']} px, pre-processing resize + backbone normalisation for all models. "
        f"FastFlow epochs per task {meta['fastflow_epochs']} ({meta['epochs_note']}); PatchCore coreset ratio "
        f"{meta['coreset_ratio']}, 9 neighbours. Timings: median of {meta['timing_repeats']} runs after "
        f"{meta['timing_warmup']} warm-ups, model forward on pre-processed images. "
        f"MoLE-Flow: `{meta['moleflow_command']}`."),
        "",
        "## Quality (final, after the last task)",
        "",
        "| model | task | image AUROC | pixel AUROC | pixel AP | routing acc. |",
        "|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        m = models.get(name)
        if not m or name == "backbone":
            continue
        for task in tasks:
            row = m["final"].get(task, {})
            lines.append(f"| {name} | {task} | {_f(row.get('image_AUROC'))} | {_f(row.get('pixel_AUROC'))} | "
                         f"{_f(row.get('pixel_AP'))} | {_f(row.get('routing_accuracy'), '.3f')} |")
        mean = m["mean"]
        lines.append(f"| **{name}** | **mean** | {_f(mean.get('image_AUROC'))} | {_f(mean.get('pixel_AUROC'))} | "
                     f"{_f(mean.get('pixel_AP'))} | {_f(m.get('routing_accuracy'), '.3f')} |")
    lines += ["", "Forgetting (best earlier value minus final, mean over earlier tasks; `-`: not sequential):", "",
              "| model | image AUROC | pixel AUROC | pixel AP |", "|---|---|---|---|"]
    for name in MODELS:
        m = models.get(name)
        if m and "forgetting" in m:
            fg = m["forgetting"]
            lines.append(f"| {name} | " + " | ".join(_f(fg.get(k)) for k in METRICS) + " |")
    lines += ["", "## Cost", "",
              ("| model | train s per task | latency ms/img (b1) | throughput img/s (b32) | params total | "
               "params added per task | stored numbers added per task | model file MiB | peak RSS MiB |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        m = models.get(name)
        if not m:
            continue
        train = m.get("train_seconds")
        train_text = ", ".join(f"{t} {_f(s, '.1f')}" for t, s in train.items()) if train else "-"
        lines.append(
            f"| {name} | {train_text} | {_f(m.get('latency_ms_b1'), '.1f')} | {_f(m.get('throughput_b32'), '.1f')} | "
            f"{_count(m.get('params_total'))} | {_count(m.get('params_added_per_task'))} | "
            f"{_count(m.get('state_numel_added_per_task'))} | {_f((m.get('model_file_bytes') or 0) / 2**20, '.1f')} | "
            f"{_f(m.get('peak_rss_mib'), '.0f')} |"
        )
    lines += ["", "Models: " + "; ".join(f"`{k}` = {v}" for k, v in LABELS.items() if k in models) + ".",
              ("Stored numbers = parameters + buffers (PatchCore's memory bank). Peak RSS: the model's own worker "
               "process (MoLE-Flow: max of its training subprocess and the timing process)."), "",
              "## Ratios (measured in this run)", ""]
    r = data["ratios"]
    for key in ("moleflow_latency_over_backbone", "moleflow_throughput_over_patchcore",
                "moleflow_throughput_over_backbone", "moleflow_train_per_task_over_fastflow"):
        lines.append(f"- {key}: {_f(r.get(key), '.3f')}")
    lines.append(f"- moleflow_params_added_per_task: {_count(r.get('moleflow_params_added_per_task'))}")
    for other, gaps in r["gaps"].items():
        lines.append(f"- quality gap MoLE-Flow minus {other}: " + ", ".join(f"{k} {_pts(v)}" for k, v in gaps.items()))
    lines += ["", "## Targets of the issue", "", "| target | requirement | measured | verdict | margin |",
              "|---|---|---|---|---|"]
    for t in data["targets"]:
        value = t["value"]
        shown = "-" if value is None else (_pts(value) if t["unit"] == "AUROC" else
                                           (_count(value) if t["unit"] == "params" else f"{value:.3f}x"))
        lines.append(f"| {t['target']} | {t['requirement']} | {shown} | **{t['verdict']}** | {_margin(t)} |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in data["plots"]), ""]
    return "\n".join(lines)


def plots(data: dict[str, Any], out_dir: Path) -> list[str]:
    """``compare_quality.png``, ``compare_speed.png``, ``compare_cost.png``; returns their names."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    models, tasks = data["models"], data["meta"]["tasks"]
    trained = [n for n in MODELS if n in models and n != "backbone"]
    timed = [n for n in MODELS if n in models]
    written = []

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
    written.append(_save(fig, out_dir / "compare_quality.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, key, title in ((axes[0], "latency_ms_b1", "latency ms / image, batch 1 (lower is better)"),
                           (axes[1], "throughput_b32", "throughput images / s, batch 32 (higher is better)")):
        ax.bar(timed, [models[n].get(key) or 0 for n in timed], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    written.append(_save(fig, out_dir / "compare_speed.png"))

    fig, axes = plt.subplots(1, 4, figsize=(16, 4), layout="constrained")
    series = (
        ("mean train s per task", lambda m: _mean_train(m)),
        ("stored numbers added per task (M)", lambda m: (m.get("state_numel_added_per_task") or 0) / 1e6),
        ("model file MiB", lambda m: (m.get("model_file_bytes") or 0) / 2**20),
        ("peak RSS MiB", lambda m: m.get("peak_rss_mib")),
    )
    for ax, (title, fn) in zip(axes, series, strict=True):
        names = trained if "train" in title or "added" in title else timed
        ax.bar(names, [fn(models[n]) or 0 for n in names], color="tab:orange")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    written.append(_save(fig, out_dir / "compare_cost.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, dpi=100)
    return path.name
