"""Scale benchmark: how MoLE-Flow's cost grows as the continual stream grows from 1 to N tasks.

    python benchmarks/scale.py --tasks 15 --threads 1

Generates N visually distinct synthetic MVTec-layout products (``anomalib_moleflow.data.synthetic``)
in a temporary folder, runs MoLE-Flow continually over them with the default model
configuration (``MoLEFlowConfig()``: EfficientNet-Lite0, 256 px) and, after each task t, records:

* routed inference latency per image at batch 1 (median over images of all seen tasks,
  after warm-ups), the router's own share of it, and throughput at batch 32;
* routing accuracy and image AUROC (routed and oracle), averaged over the seen tasks;
* current and peak resident memory of this process;
* model parameters (total, added by task t), checkpoint size, and task t's train time.

Writes ``benchmarks/results/scale.{json,md,png}`` with the command. Few images and epochs
per task keep the run short on a CPU; latency is that of the real model, quality is not.
The run, the report and the plot live in ``scale_lib/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from reporting import finish_meta, run_meta, write_json
from scale_lib.measure import ROW_KEYS, run_benchmark
from scale_lib.plots import plot
from scale_lib.report import markdown, summarize
from scale_lib.settings import ScaleSettings

from anomalib_moleflow.data.synthetic import STREAMS
from anomalib_moleflow.models.moleflow import MoLEFlowConfig

RESULTS = Path(__file__).resolve().parent / "results"
__all__ = ["ROW_KEYS", "main", "parse_args", "write_results"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: :class:`ScaleSettings`)."""
    d = ScaleSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=d.tasks, help="number of products, 1..15")
    p.add_argument("--train-images", type=int, default=d.train_images, help="normal training images per task")
    p.add_argument("--test-images", type=int, default=d.test_images, help="test images per task (half defective)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per task")
    p.add_argument("--later-epochs", type=int, default=d.later_epochs, help="epochs of tasks after the first")
    p.add_argument("--image-px", type=int, default=d.image_px, help="side of the generated images")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed forwards before timing")
    p.add_argument("--latency-runs", type=int, default=d.latency_runs, help="timed batch-1 images (>= tasks seen)")
    p.add_argument("--throughput-batch", type=int, default=d.throughput_batch)
    p.add_argument("--throughput-runs", type=int, default=d.throughput_runs, help="timed batches (median)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stream", choices=sorted(STREAMS), default=d.stream, help="synthetic stream of products")
    p.add_argument("--output-dir", default=str(RESULTS), help="where scale.{json,md,png} go")
    p.add_argument("--work-dir", default=None, help="keep data and checkpoints here (default: a temp folder)")
    p.add_argument("--model-config", default=None,
                   help='JSON of MoLEFlowConfig fields to override, nested or flat (e.g. \'{"flow": {"n_coupling_blocks": 6}}\')')
    return p.parse_args(argv)


def write_results(result: dict[str, Any], output_dir: Path) -> list[Path]:
    """Write ``scale.json``, ``scale.md`` and ``scale.png`` into ``output_dir``."""
    paths = [output_dir / "scale.json", output_dir / "scale.md", output_dir / "scale.png"]
    write_json(paths[0], result)
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths


def _rows(settings: ScaleSettings, work_dir: str | None, config: MoLEFlowConfig) -> list[dict[str, Any]]:
    """The run in ``work_dir`` (kept; must not hold a run yet) or in a temporary folder."""
    if work_dir:
        work = Path(work_dir)
        if (work / "run").exists():
            raise SystemExit(f"'{work / 'run'}' exists: a benchmark measures a fresh run; choose another --work-dir")
        return run_benchmark(settings, work, config)
    with tempfile.TemporaryDirectory(prefix="moleflow_scale_") as tmp:
        return run_benchmark(settings, Path(tmp), config)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results; returns what ``scale.json`` holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = ScaleSettings(**{k: getattr(args, k) for k in asdict(ScaleSettings())})
    overrides = json.loads(args.model_config) if args.model_config else {}
    config = MoLEFlowConfig.from_dict(overrides)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    rows = _rows(settings, args.work_dir, config)
    meta = finish_meta(run_meta("scale.py", argv), start)
    meta.update({
        "wall_minutes": meta["wall_seconds"] / 60,
        "settings": asdict(settings),
        "model_config": config.to_dict(),
        "tasks": list(STREAMS[settings.stream])[: settings.tasks],
        "model_config_note": f"MoLEFlowConfig() with {json.dumps(overrides)}" if overrides else "MoLEFlowConfig() defaults",
    })
    result: dict[str, Any] = {"meta": meta, "rows": rows, "summary": summarize(rows)}
    for path in write_results(result, Path(args.output_dir)):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
