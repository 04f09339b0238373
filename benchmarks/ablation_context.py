"""The context branch of a continual run over its epochs: Baseline 1.5's global alpha or Baseline
2.0's patch-wise gate per coupling block, read from each task's ``metrics.csv``.

A continual run logs, per task, ``<run>/logs/task_<tt>_<name>/metrics.csv``; the model adds the
context columns once per epoch (``context_alpha/block_<i>``, or ``gate_mean/block_<i>`` ...
``gate_max/block_<i>`` and the summaries ``gate_min`` / ``gate_max``). :func:`plot_context` draws
one figure of a run: one line per block over the epochs of every task in order, task boundaries
marked; for the gate, the band between the smallest and largest gate of any block.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from reporting import pyplot, save_figure

#: Which column family each kind of context logs per block, and its axis label.
KINDS: dict[str, tuple[str, str]] = {
    "gate": ("gate_mean/block_", "patch-wise gate (mean over the patches)"),
    "alpha": ("context_alpha/block_", "global context alpha"),
}


def task_logs(run_dir: Path) -> list[tuple[str, list[dict[str, str]]]]:
    """``(task name, metrics.csv rows)`` of every task of a run, in task order."""
    out = []
    for folder in sorted((Path(run_dir) / "logs").glob("task_*_*")):
        path = folder / "metrics.csv"
        if not path.is_file():
            continue
        name = re.sub(r"^task_\d+_", "", folder.name)
        with path.open(newline="") as f:
            out.append((name, list(csv.DictReader(f))))
    return out


def _series(rows: list[dict[str, str]], column: str) -> list[float]:
    """One value per epoch of ``column`` (the rows that have it, in epoch order)."""
    values = [(int(row["epoch"]), float(row[column])) for row in rows if row.get(column) not in (None, "")]
    return [value for _, value in sorted(values)]


def context_kind(logs: list[tuple[str, list[dict[str, str]]]]) -> str | None:
    """``gate``, ``alpha`` or ``None``: which context columns the run's logs hold."""
    header = {column for _, rows in logs for row in rows[:1] for column in row}
    for kind, (prefix, _) in KINDS.items():
        if any(column.startswith(prefix) for column in header):
            return kind
    return None


def plot_context(run_dir: Path, title: str, path: Path) -> str | None:
    """Draw the run's context branch per block over its epochs into the PNG ``path``; return its
    file name, or ``None`` when the run logged no context columns."""
    logs = task_logs(run_dir)
    kind = context_kind(logs)
    if kind is None:
        return None
    prefix, label = KINDS[kind]
    blocks = sorted({int(c.removeprefix(prefix)) for _, rows in logs for row in rows[:1] for c in row if c.startswith(prefix)})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = 0
    boundaries: list[tuple[int, str]] = []
    for name, rows in logs:
        n = 0
        for block in blocks:
            values = _series(rows, f"{prefix}{block}")
            n = max(n, len(values))
            ax.plot(range(start, start + len(values)), values, marker="o", markersize=3, color=f"C{block % 10}",
                    label=f"block {block}" if not boundaries else None)  # fmt: skip
        if kind == "gate":
            low, high = _series(rows, "gate_min"), _series(rows, "gate_max")
            if low and len(low) == len(high):
                ax.fill_between(range(start, start + len(low)), low, high, color="0.6", alpha=0.25,
                                label="min .. max over blocks" if not boundaries else None)  # fmt: skip
        boundaries.append((start, name))
        start += n
    for x, name in boundaries:
        ax.axvline(x - 0.5, color="0.4", linestyle="--", linewidth=0.8)
        ax.text(x - 0.4, 1.0, name, transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_xlabel("epoch (tasks in order)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def context_plots(run_dirs: dict[str, Path], results: Path) -> dict[str, Any]:
    """``ablations_context_<preset>.png`` in ``results`` for every preset run that logged its context
    branch; returns ``{preset: file name}``."""
    out = {}
    for preset, run_dir in run_dirs.items():
        name = plot_context(run_dir, f"{preset}: context branch per coupling block", results / f"ablations_context_{preset}.png")
        if name is not None:
            out[preset] = name
    return out
