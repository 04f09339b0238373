"""What every benchmark writes around its numbers: the results header, memory, tables and plots.

Imported as a sibling module (``from reporting import ...``): a script run as
``python benchmarks/<script>.py`` has ``benchmarks/`` first on ``sys.path``.

* :func:`run_meta` - the command line that made the results (with ``OMP_NUM_THREADS`` when
  set), date, machine (CPU, cores, GPU or none), torch threads and version;
* :func:`finish_meta` - wall time and peak resident memory (this process and its children);
* :func:`header_line` - that header as one markdown sentence;
* :func:`markdown_table` - a markdown table from a header and rows;
* :func:`pyplot` / :func:`save_figure` - headless matplotlib and PNG saving;
* :func:`write_json` - a results JSON file.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

DATE_FORMAT = "%Y-%m-%d %H:%M"


# ----------------------------------------------------------------------------- the run
def command_line(script: str, argv: Sequence[str]) -> str:
    """``[OMP_NUM_THREADS=n ]python benchmarks/<script> <argv>``, quoted for a shell.

    The thread count changes floating-point summation order, hence scores a little, so it is
    part of what reproduces a result.
    """
    command = shlex.join(["python", f"benchmarks/{script}", *argv])
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads} {command}" if threads else command


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first CUDA device's name, or ``None`` without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine() -> str:
    """``<CPU>, <n> CPU cores, <GPU or "no GPU">``."""
    gpu = gpu_name()
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, {gpu if gpu else 'no GPU'}"


def run_meta(script: str, argv: Sequence[str]) -> dict[str, Any]:
    """The header every results file starts with (keys: command, date, machine, threads,
    OMP_NUM_THREADS, torch, python); ``threads`` is torch's intra-op thread count now."""
    import torch

    return {
        "command": command_line(script, argv),
        "date": time.strftime(DATE_FORMAT),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def finish_meta(meta: dict[str, Any], start: float) -> dict[str, Any]:
    """Add ``wall_seconds`` (since ``start``, a :func:`time.perf_counter` value) and the peak
    resident memory of this process and of its finished children to ``meta``; returns it."""
    meta["wall_seconds"] = time.perf_counter() - start
    peak = peak_rss_mib()
    meta["peak_rss_mib_self"] = peak["self"]
    meta["peak_rss_mib_children"] = peak["children"]
    return meta


def peak_of(meta: dict[str, Any]) -> float | None:
    """The larger of the peak memory figures a header holds (``None`` without any)."""
    values = [meta.get(key) for key in ("peak_rss_mib_self", "peak_rss_mib_children", "peak_rss_mib")]
    present = [v for v in values if v is not None]
    return max(present) if present else None


def header_line(meta: dict[str, Any]) -> str:
    """``Command: `...` (date, machine, n torch thread(s); whole run x min, peak RSS y MiB).``

    Parts a header lacks (results written before this module) are left out.
    """
    parts = [meta["date"], meta["machine"]]
    if meta.get("threads") is not None:
        parts.append(f"{meta['threads']} torch thread(s)")
    if meta.get("MKL_CBWR"):
        parts.append(f"MKL_CBWR={meta['MKL_CBWR']}")
    extra = []
    minutes = meta["wall_seconds"] / 60 if "wall_seconds" in meta else meta.get("wall_minutes")
    if minutes is not None:
        extra.append(f"whole run {minutes:.1f} min")
    peak = peak_of(meta)
    if peak is not None:
        extra.append(f"peak RSS {peak:.0f} MiB")
    return f"Command: `{meta['command']}` ({', '.join(parts)}" + (f"; {', '.join(extra)}" if extra else "") + ")."


# ----------------------------------------------------------------------------- memory
def _maxrss_mib(who: int) -> float:
    """``ru_maxrss`` in MiB (KiB on Linux, bytes on macOS)."""
    return resource.getrusage(who).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory in MiB of this process (``self``) and of its largest finished,
    waited-for child process (``children``; 0 without any)."""
    return {"self": _maxrss_mib(resource.RUSAGE_SELF), "children": _maxrss_mib(resource.RUSAGE_CHILDREN)}


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (``/proc/self/status``; NaN elsewhere).

    Garbage is collected and glibc asked to return freed heap memory first (``malloc_trim``);
    otherwise the reading mostly shows what the allocator keeps from the largest forward so far.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------- files
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a markdown table; cells are written with ``str`` (an empty cell as ``| |``)."""

    def line(cells: Iterable[object]) -> str:
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


CONTINUAL_HEADER: tuple[str, ...] = (
    "task", "image AUROC", "pixel AUROC", "pixel AP", "routing acc.", "oracle image AUROC", "train s",
)  # fmt: skip


def _cells(row: dict[str, Any], *keys: str, digits: int = 4) -> list[str]:
    return ["-" if row.get(key) is None else f"{row[key]:.{digits}f}" for key in keys]


def continual_table(metrics: dict[str, Any]) -> list[str]:
    """Per-task and mean results of a continual run (``ContinualResults.to_dict()``, i.e.
    ``continual_metrics.json``), then its forgetting and inference time, as markdown lines."""
    train = metrics["timing"]["train_seconds"]

    def cells(row: dict[str, Any]) -> list[str]:
        return [*_cells(row, "image_AUROC", "pixel_AUROC", "pixel_AP"), *_cells(row, "routing_accuracy", digits=3),
                *_cells(row["oracle"], "image_AUROC")]  # fmt: skip

    rows = [[name, *cells(metrics["final"][name]), *_cells(train, name, digits=0)] for name in metrics["final"]]
    rows.append(["**mean**", *cells(metrics["mean"]), ""])
    forgetting = ", ".join(f"{k} {v}" for k, v in metrics["forgetting"].items() if not isinstance(v, dict))
    inference = metrics["timing"]["inference_ms_per_image"]
    return [
        *markdown_table(CONTINUAL_HEADER, rows),
        "",
        f"Forgetting (best earlier minus final): {forgetting}. "
        f"Inference: {'-' if inference is None else f'{inference:.1f}'} ms per image (routed, in-model time).",
    ]


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (folders created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_results(folder: Path, name: str, data: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write ``<folder>/<name>.json`` and ``<name>.md`` (rendered by ``markdown``); print and return the markdown."""
    write_json(Path(folder) / f"{name}.json", data)
    text = markdown(data)
    (Path(folder) / f"{name}.md").write_text(text)
    print(text)
    return text


def pyplot() -> Any:  # noqa: ANN401 - the matplotlib.pyplot module
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> str:  # noqa: ANN401 - a matplotlib Figure
    """Save ``fig`` as PNG at ``path``, close it and return the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path.name
