"""The comparison's report ``compare.md``: settings, quality, forgetting, costs, ratios, targets."""

from __future__ import annotations

from typing import Any

from reporting import markdown_table

from .names import LABELS, METRICS, MODELS
from .targets import points


def _f(value: Any, fmt: str = ".4f") -> str:  # noqa: ANN401 - a number or None
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


def _settings(meta: dict[str, Any]) -> list[str]:
    return [
        "# MoLE-Flow against anomalib PatchCore and FastFlow (same machine, data, backbone, input size)",
        "",
        f"Command: `{meta['command']}`",
        "",
        (f"{meta['date']}, {meta['machine']}, torch threads {meta['threads']}. Tasks: {' -> '.join(meta['tasks'])}. "
         f"Backbone `{meta['backbone']}` stages {meta['layers']} (timm out_indices {meta['out_indices']}), "
         f"input {meta['image_size']} px, pre-processing resize + backbone normalisation for all models. "
         f"FastFlow epochs per task {meta['fastflow_epochs']} ({meta['epochs_note']}); PatchCore coreset ratio "
         f"{meta['coreset_ratio']}, 9 neighbours. Timings: median of {meta['timing_repeats']} runs after "
         f"{meta['timing_warmup']} warm-ups, model forward on pre-processed images. "
         f"MoLE-Flow: `{meta['moleflow_command']}`."),
        "",
    ]


def _quality(models: dict[str, Any], tasks: list[str]) -> list[str]:
    rows = []
    for name in MODELS:
        m = models.get(name)
        if not m or name == "backbone":
            continue
        for task in tasks:
            row = m["final"].get(task, {})
            rows.append((name, task, _f(row.get("image_AUROC")), _f(row.get("pixel_AUROC")), _f(row.get("pixel_AP")),
                         _f(row.get("routing_accuracy"), ".3f")))
        mean = m["mean"]
        rows.append((f"**{name}**", "**mean**", _f(mean.get("image_AUROC")), _f(mean.get("pixel_AUROC")),
                     _f(mean.get("pixel_AP")), _f(m.get("routing_accuracy"), ".3f")))
    header = ("model", "task", "image AUROC", "pixel AUROC", "pixel AP", "routing acc.")
    forgetting = [(name, *(_f(models[name]["forgetting"].get(k)) for k in METRICS))
                  for name in MODELS if name in models and "forgetting" in models[name]]
    return [
        "## Quality (final, after the last task)", "", *markdown_table(header, rows), "",
        "Forgetting (best earlier value minus final, mean over earlier tasks; `-`: not sequential):", "",
        *markdown_table(("model", "image AUROC", "pixel AUROC", "pixel AP"), forgetting), "",
    ]  # fmt: skip


def _cost_row(name: str, m: dict[str, Any]) -> tuple[str, ...]:
    train = m.get("train_seconds")
    train_text = ", ".join(f"{t} {_f(s, '.1f')}" for t, s in train.items()) if train else "-"
    return (name, train_text, _f(m.get("latency_ms_b1"), ".1f"), _f(m.get("throughput_b32"), ".1f"),
            _count(m.get("params_total")), _count(m.get("params_added_per_task")),
            _count(m.get("state_numel_added_per_task")), _f((m.get("model_file_bytes") or 0) / 2**20, ".1f"),
            _f(m.get("peak_rss_mib"), ".0f"))  # fmt: skip


def _cost(models: dict[str, Any]) -> list[str]:
    header = ("model", "train s per task", "latency ms/img (b1)", "throughput img/s (b32)", "params total",
              "params added per task", "stored numbers added per task", "model file MiB", "peak RSS MiB")
    rows = [_cost_row(name, models[name]) for name in MODELS if models.get(name)]
    return [
        "## Cost", "", *markdown_table(header, rows), "",
        "Models: " + "; ".join(f"`{k}` = {v}" for k, v in LABELS.items() if k in models) + ".",
        ("Stored numbers = parameters + buffers (PatchCore's memory bank). Peak RSS: the model's own worker "
         "process (MoLE-Flow: max of its training subprocess and the timing process)."), "",
    ]  # fmt: skip


def _ratios(r: dict[str, Any]) -> list[str]:
    lines = ["## Ratios (measured in this run)", ""]
    for key in ("moleflow_latency_over_backbone", "moleflow_throughput_over_patchcore",
                "moleflow_throughput_over_backbone", "moleflow_train_per_task_over_fastflow"):  # fmt: skip
        lines.append(f"- {key}: {_f(r.get(key), '.3f')}")
    lines.append(f"- moleflow_params_added_per_task: {_count(r.get('moleflow_params_added_per_task'))}")
    for other, gaps in r["gaps"].items():
        lines.append(f"- quality gap MoLE-Flow minus {other}: " + ", ".join(f"{k} {points(v)}" for k, v in gaps.items()))
    return [*lines, ""]


def _shown(t: dict[str, Any]) -> str:
    value = t["value"]
    if value is None:
        return "-"
    if t["unit"] == "AUROC":
        return points(value)
    return _count(value) if t["unit"] == "params" else f"{value:.3f}x"


def _targets(targets: list[dict[str, Any]]) -> list[str]:
    rows = [(t["target"], t["requirement"], _shown(t), f"**{t['verdict']}**", _margin(t)) for t in targets]
    return ["## Targets", "", *markdown_table(("target", "requirement", "measured", "verdict", "margin"), rows), ""]


def markdown(data: dict[str, Any]) -> str:
    """The report from what ``compare.json`` holds."""
    meta, models = data["meta"], data["models"]
    lines = [*_settings(meta), *_quality(models, meta["tasks"]), *_cost(models), *_ratios(data["ratios"])]
    lines += [*_targets(data["targets"]), "Plots: " + ", ".join(f"`{p}`" for p in data["plots"]), ""]
    return "\n".join(lines)
