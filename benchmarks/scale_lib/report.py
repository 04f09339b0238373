"""The scale benchmark's summary (last task count against the first ones) and ``scale.md``."""

from __future__ import annotations

import math
from typing import Any

from reporting import header_line, markdown_table

from .measure import mean

FLAT_TOLERANCE = 0.25
"""A ratio within ``[1 / (1 + tol), 1 + tol]`` counts as flat (short CPU runs are noisy)."""
TABLE_HEADER: tuple[str, ...] = (
    "tasks", "latency ms (b=1)", "oracle ms (b=1)", "routing overhead ms", "router ms", "img/s (b=32)",
    "experts in batch", "routing acc", "img AUROC routed", "img AUROC oracle", "RSS MiB", "peak RSS MiB",
    "params total", "params added", "ckpt MiB", "train s",
)  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _flat(ratio: float | None) -> bool | None:
    return None if ratio is None else 1 / (1 + FLAT_TOLERANCE) <= ratio <= 1 + FLAT_TOLERANCE


def _per_later_task(rows: list[dict[str, Any]], key: str) -> float | None:
    return (rows[-1][key] - rows[0][key]) / (len(rows) - 1) if len(rows) > 1 else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the last task count against the first ones, and whether each stays flat."""
    first, last = rows[0], rows[-1]
    second = rows[1] if len(rows) > 1 else None
    later = rows[1:]  # task 0 also trains the shared flow: compare later tasks among themselves
    tail = later[-min(3, len(later) - 1) :] if len(later) > 1 else []
    train_last = mean([r["train_seconds"] for r in tail]) if tail else None
    of_second = lambda key: second[key] if second else None  # noqa: E731
    out: dict[str, Any] = {
        "n_tasks": last["n_tasks"],
        "latency_ratio_last_vs_1": _ratio(last["latency_ms_batch1_median"], first["latency_ms_batch1_median"]),
        "latency_ratio_last_vs_2": _ratio(last["latency_ms_batch1_median"], of_second("latency_ms_batch1_median")),
        "route_ms_ratio_last_vs_2": _ratio(last["route_ms_batch1_median"], of_second("route_ms_batch1_median")),
        "route_ms_ratio_interleaved": _ratio(last.get("route_ms_interleaved_all"), last.get("route_ms_interleaved_2")),
        "throughput_ratio_last_vs_1": _ratio(last["throughput_img_per_s"], first["throughput_img_per_s"]),
        "train_seconds_task1": of_second("train_seconds"),
        "train_seconds_last_tasks_mean": train_last,
        "train_last_tasks": [r["task"] for r in tail],
        "train_ratio_last_vs_task1": _ratio(train_last, of_second("train_seconds")),
        "params_added_per_later_task": sorted({r["params_added"] for r in later}),
        "checkpoint_mib_per_later_task": _per_later_task(rows, "checkpoint_mib"),
        "rss_mib_per_later_task": _per_later_task(rows, "rss_mib"),
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


def _verdict(summ: dict[str, Any], what: str, which: str, inverse: bool = False) -> str:
    """``flat``, ``cost GROWS`` or ``cost drops`` for ``<what>_ratio_<which>`` (``inverse``: a rate)."""
    flat, ratio = summ[f"{what}_flat_{which}"], summ[f"{what}_ratio_{which}"]
    if flat is None or ratio is None:
        return "n/a"
    if inverse:
        ratio = 1 / ratio  # throughput: a lower rate is a higher cost
    return "flat" if flat else ("cost GROWS" if ratio > 1 else "cost drops")


def _intro(meta: dict[str, Any], n: int) -> list[str]:
    settings = meta["settings"]
    return [
        f"# MoLE-Flow scale benchmark: 1 to {n} tasks",
        "",
        header_line(meta),
        "",
        f"Model: {meta['model_config_note']}. Data: {n} synthetic products (`anomalib_moleflow.data.synthetic`), "
        f"{settings['train_images']} training and {settings['test_images']} test images each "
        f"({settings['image_px']} px), {settings['epochs']} epoch(s) per task. Quality numbers "
        "(AUROC) of such short runs say little; cost and routing are the point.",
        "",
        "Latency: routed `MoLEFlowModel.forward` (backbone, router, expert flow, anomaly map) on one "
        "pre-processed image, median over images of all seen tasks after warm-ups; oracle = the same image "
        "through its true expert without the router, timed right after it (routing overhead = median of the "
        "differences, which other processes sharing the CPU disturb far less than the latencies); router = "
        f"`route()` alone. Throughput: batch of {settings['throughput_batch']} images mixed round-robin "
        "over all seen tasks. Memory: RSS of this process (peak includes the batch forward). Checkpoint: "
        "the runner's `task_<t>.ckpt`.",
        "",
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        (r["n_tasks"], _fmt(r["latency_ms_batch1_median"]), _fmt(r["oracle_latency_ms_batch1_median"]),
         _fmt(r["routing_overhead_ms_batch1_median"], 2), _fmt(r["route_ms_batch1_median"], 3),
         _fmt(r["throughput_img_per_s"], 2), r["experts_in_batch"], _fmt(r["routing_accuracy"], 3),
         _fmt(r["image_AUROC_mean_routed"], 3), _fmt(r["image_AUROC_mean_oracle"], 3), _fmt(r["rss_mib"], 0),
         _fmt(r["peak_rss_mib"], 0), _fmt(r["params_total"]), _fmt(r["params_added"]), _fmt(r["checkpoint_mib"], 2),
         _fmt(r["train_seconds"]))
        for r in rows
    ]  # fmt: skip
    return markdown_table(TABLE_HEADER, cells)


def _router_bullet(rows: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    """``route()`` time against 2 tasks, with the target of at most 1.2x. The verdict comes from the
    interleaved timing of the last model (all its tasks vs its first two, timed in alternation), which
    a CPU shared with other processes disturbs far less than readings taken minutes apart."""
    second, last, n = rows[1], rows[-1], summ["n_tasks"]
    ratio = summ.get("route_ms_ratio_interleaved")
    verdict = "flat, target <= 1.2x" if ratio is not None and ratio <= 1.2 else "grows, target <= 1.2x"
    return (
        f"- **Router** ({verdict}): timed in alternation on the final model, `route()` takes "
        f"{_fmt(last.get('route_ms_interleaved_all'), 3)} ms with all {n} tasks and "
        f"{_fmt(last.get('route_ms_interleaved_2'), 3)} ms with its first two (x{_fmt(ratio, 2)}). Read after "
        f"each task instead (column router ms, minutes apart): {_fmt(second['route_ms_batch1_median'], 3)} ms at "
        f"2 tasks and {_fmt(last['route_ms_batch1_median'], 3)} ms at {n} "
        f"(x{_fmt(summ['route_ms_ratio_last_vs_2'], 2)}; the oracle column shows how the CPU's speed drifted "
        "meanwhile). Every router first takes the distance to every task prototype (one product over "
        "stacked pooled-feature statistics: linear in the tasks but small); the memory router (the default) "
        "then compares the image's patches with the memories of its two shortlisted candidates, a cost that "
        "does not grow with the number of tasks."
    )


def _speed_bullets(rows: list[dict[str, Any]], summ: dict[str, Any]) -> list[str]:
    first, second, last, n = rows[0], rows[1], rows[-1], summ["n_tasks"]
    return [
        f"- **Latency, batch 1** ({_verdict(summ, 'latency', 'last_vs_1')} vs 1 task, "
        f"{_verdict(summ, 'latency', 'last_vs_2')} vs 2 tasks): {_fmt(last['latency_ms_batch1_median'])} ms at "
        f"{n} tasks vs {_fmt(first['latency_ms_batch1_median'])} ms at 1 task "
        f"(x{_fmt(summ['latency_ratio_last_vs_1'], 2)}) and {_fmt(second['latency_ms_batch1_median'])} ms at "
        f"2 tasks (x{_fmt(summ['latency_ratio_last_vs_2'], 2)}). With one task the router is off; from two "
        "tasks on each image pays the router once and runs exactly one expert, so batch-1 latency does not "
        "depend on the number of experts apart from the router. Routing overhead per image (routed - oracle): "
        f"{_fmt(second['routing_overhead_ms_batch1_median'], 2)} ms at 2 tasks, "
        f"{_fmt(last['routing_overhead_ms_batch1_median'], 2)} ms at {n}; the oracle latency goes "
        f"{_fmt(first['oracle_latency_ms_batch1_median'])} -> {_fmt(last['oracle_latency_ms_batch1_median'])} ms "
        "(a change there comes from the CPU's load, not the model).",
        _router_bullet(rows, summ),
        f"- **Throughput, batch {last['throughput_batch']}** ({_verdict(summ, 'throughput', 'last_vs_1', inverse=True)}): "
        f"{_fmt(last['throughput_img_per_s'], 2)} img/s at {n} tasks vs {_fmt(first['throughput_img_per_s'], 2)} "
        f"at 1 task (x{_fmt(summ['throughput_ratio_last_vs_1'], 2)}); the last batch was split among "
        f"{last['experts_in_batch']} experts. The routed forward groups a batch's images by expert and runs "
        "each expert's flow on its group, so a batch mixing many products runs many small flow passes "
        "(less efficient than one large one) while the backbone still runs once on the whole batch.",
    ]


def _routing_bullet(meta: dict[str, Any], rows: list[dict[str, Any]], n: int) -> str:
    second, last = rows[1], rows[-1]
    misrouted = [
        f"{name} {acc:.2f}"
        for name, acc in zip(meta["tasks"], last["routing_accuracy_per_task"], strict=False)
        if acc is not None and acc < 1
    ]
    return (
        f"- **Routing**: {_fmt(last['routing_accuracy'], 3)} of all seen tasks' test images go to their own expert "
        f"at {n} tasks ({_fmt(second['routing_accuracy'], 3)} at 2). "
        + (f"Tasks routed imperfectly at the end: {', '.join(misrouted)}. " if misrouted else "Every task perfectly. ")
        + "The per-task values after each task are `routing_accuracy_per_task` in the JSON."
    )


def _train_bullet(rows: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    if summ["train_ratio_last_vs_task1"] is None:
        return "- **Train time per task**: needs at least 3 tasks to compare later tasks."
    return (
        f"- **Train time per task** ({_verdict(summ, 'train', 'last_vs_task1')}): task 1 took "
        f"{_fmt(summ['train_seconds_task1'])} s, the last tasks ({', '.join(summ['train_last_tasks'])}) "
        f"{_fmt(summ['train_seconds_last_tasks_mean'])} s on average "
        f"(x{_fmt(summ['train_ratio_last_vs_task1'], 2)}). Task 0 ({_fmt(rows[0]['train_seconds'])} s) also trains "
        "the shared flow, mixer and context, so it is not compared. A later task trains only its own "
        "expert on cached features of its own images; nothing in it depends on earlier tasks."
    )


def _size_bullets(rows: list[dict[str, Any]], summ: dict[str, Any]) -> list[str]:
    first, last, n = rows[0], rows[-1], summ["n_tasks"]
    return [
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


def markdown(result: dict[str, Any]) -> str:
    """The results file ``scale.md`` from what ``scale.json`` holds."""
    meta, rows, summ = result["meta"], result["rows"], result["summary"]
    n = summ["n_tasks"]
    lines = [*_intro(meta, n), *_table(rows), "", "## Does the cost per task stay flat?", ""]
    if len(rows) < 2:
        lines.append("Only one task was run: nothing to compare.")
        return "\n".join(lines) + "\n"
    lines += [f"A ratio counts as flat within +-{FLAT_TOLERANCE:.0%} (few images, short timings).", ""]
    lines += _speed_bullets(rows, summ)
    lines.append(_routing_bullet(meta, rows, n))
    lines.append(_train_bullet(rows, summ))
    lines += _size_bullets(rows, summ)
    return "\n".join(lines) + "\n"
