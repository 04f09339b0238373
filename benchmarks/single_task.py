"""Single-task MoLE-Flow benchmark: quality, train time, latency and peak memory per category.

Each category runs in its own subprocess (so peak memory is that category's), through
anomalib's ``Engine`` exactly as ``anomalib train`` does, with the model settings of
``anomalib_moleflow/configs/moleflow.yaml``.

    python benchmarks/single_task.py --root ../shared/data/mvtec_ad --categories bottle transistor

Writes ``<results-dir>/single_task.json`` and ``single_task.md`` (with the command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reporting import (
    finish_meta,
    header_line,
    markdown_table,
    peak_rss_mib,
    run_meta,
    write_results,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE.parent / "anomalib_moleflow" / "configs" / "moleflow.yaml"
TABLE_HEADER = ("category", "epochs", "image AUROC", "pixel AUROC", "train s", "inference ms/img (batch 1)",
                "peak RSS MiB")  # fmt: skip


def _config_settings() -> tuple[dict[str, Any], int]:
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    model_cfg = (cfg.get("model", {}).get("init_args", {}) or {}).get("config", {}) or {}
    return model_cfg, int(cfg.get("trainer", {}).get("max_epochs", 20))


def run_category(root: str, category: str, epochs: int | None) -> dict[str, Any]:
    """Train and test one category in this process; return its figures."""
    import torch
    from anomalib.engine import Engine

    from anomalib_moleflow import MoLEFlow, MoLEFlowConfig
    from anomalib_moleflow.data import MVTecADLocal

    model_cfg, cfg_epochs = _config_settings()
    epochs = epochs or cfg_epochs
    torch.manual_seed(0)
    datamodule = MVTecADLocal(root=root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=2)
    model = MoLEFlow(config=MoLEFlowConfig.from_dict(model_cfg))
    work = Path(os.environ.get("BENCH_WORKDIR", "/tmp/moleflow_bench")) / category
    engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(work), logger=False)
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]

    # latency: pre-processing + model + post-processing on one image, batch 1, median of 20
    model.eval()
    datamodule.setup("test")
    images = [datamodule.test_data[i].image for i in range(min(20, len(datamodule.test_data)))]
    times = []
    with torch.no_grad():
        for image in images:
            t0 = time.perf_counter()
            model(image[None])
            times.append(1000.0 * (time.perf_counter() - t0))
    return {
        "category": category,
        "epochs": epochs,
        "image_AUROC": metrics.get("image_AUROC"),
        "pixel_AUROC": metrics.get("pixel_AUROC"),
        "image_F1Score": metrics.get("image_F1Score"),
        "pixel_F1Score": metrics.get("pixel_F1Score"),
        "train_seconds": train_seconds,
        "inference_ms_per_image_batch1_median": statistics.median(times),
        "peak_rss_mib": peak_rss_mib()["self"],
        "trainable_parameters": sum(p.numel() for p in model.model.trainable_parameters("0")),
    }


def markdown(data: dict[str, Any]) -> str:
    """``single_task.md`` from what ``single_task.json`` holds."""
    meta = data["meta"]
    rows = [
        (r["category"], r["epochs"], f"{r['image_AUROC']:.4f}", f"{r['pixel_AUROC']:.4f}", f"{r['train_seconds']:.0f}",
         f"{r['inference_ms_per_image_batch1_median']:.1f}", f"{r['peak_rss_mib']:.0f}")
        for r in data["results"]
    ]  # fmt: skip
    lines = [
        "# MoLE-Flow, single task (one model per category)",
        "",
        f"{header_line(meta)} Model settings from `{meta['config']}`.",
        "",
        *markdown_table(TABLE_HEADER, rows),
    ]
    return "\n".join(lines) + "\n"


def _run_one(args: argparse.Namespace, category: str) -> dict[str, Any]:
    """``run_category`` in a fresh subprocess (its own peak memory)."""
    cmd = [sys.executable, __file__, "--root", args.root, "--one", category]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - our own interpreter
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"benchmark of {category} failed (exit {out.returncode})")
    return json.loads(line.removeprefix("BENCH_JSON "))


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Benchmark every category (or, with ``--one``, one category in this process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--categories", nargs="+", default=["bottle", "transistor"])
    parser.add_argument("--epochs", type=int, default=None, help="default: trainer.max_epochs of anomalib_moleflow/configs/moleflow.yaml")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where single_task.{json,md} go")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one category, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print("BENCH_JSON " + json.dumps(run_category(args.root, args.one, args.epochs)))
        return None
    start = time.perf_counter()
    rows = []
    for category in args.categories:
        rows.append(_run_one(args, category))
        print(json.dumps(rows[-1]))
    meta = finish_meta(run_meta("single_task.py", argv), start)
    meta["config"] = str(CONFIG.relative_to(CONFIG.parent.parent))
    data = {"meta": meta, "results": rows}
    results = Path(args.results_dir)
    write_results(results, "single_task", data, markdown)
    return data


if __name__ == "__main__":
    main()
