"""Quality on every real product: MoLE-Flow's continual stream beside a nearest-neighbour ceiling.

    python benchmarks/quality.py --mvtec-root ../shared/data/mvtec_ad --elpv-root ../shared/data/elpv

1. Runs ``python -m anomalib_moleflow continual`` over ``anomalib_moleflow/configs/continual/real_four.yaml`` (bottle,
   transistor, elpv_mono, elpv_poly; task id hidden at test time) in a subprocess, with MKL's
   reproducible mode, and reads its final per-task metrics (routed and oracle).
2. Computes, on the same pre-processing and backbone features, the nearest-neighbour ceiling of
   each product (``quality_lib/nn_ceiling.py``: a PatchCore-like max patch distance to a random 25%
   memory of training patches).
3. Measures unknown products by leaving one out of the trained model (``quality_lib/unknown_products.py``).

Writes ``<results-dir>/quality.{json,md}`` with the command. About 40 minutes on a 2-core CPU.
``--config`` takes another continual YAML (e.g. a tiny synthetic stream); ``--no-ceiling`` skips step 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from quality_lib.nn_ceiling import NearestNeighbourCeiling
from quality_lib.report import markdown
from quality_lib.unknown_products import leave_one_out
from reporting import finish_meta, run_meta, write_results

from anomalib_moleflow.continual import TaskStream
from anomalib_moleflow.continual.evaluation import loader_of_test_split
from anomalib_moleflow.models.moleflow import MoLEFlow

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE.parent / "anomalib_moleflow" / "configs" / "continual" / "real_four.yaml"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mvtec-root", default="../shared/data/mvtec_ad", help="folder holding bottle/ and transistor/")
    parser.add_argument("--elpv-root", default="../shared/data/elpv", help="folder holding mono/ and poly/")
    parser.add_argument("--config", default=str(CONFIG), help="the continual YAML of the stream")
    parser.add_argument("--output-dir", default="results/continual/benchmark_quality", help="the continual run's folder")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where quality.{json,md} go")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the nearest-neighbour ceiling")
    parser.add_argument("extra", nargs="*", help="more arguments for the continual command")
    return parser.parse_args(argv)


def stream_config(args: argparse.Namespace, work: Path) -> Path:
    """The continual YAML with the data roots of the command line (ELPV task roots under ``--elpv-root``)."""
    config = yaml.safe_load(Path(args.config).read_text())
    data = config["data"]
    data["root"] = args.mvtec_root
    for task in data["tasks"]:
        if isinstance(task, dict) and str(task.get("root", "")).startswith("../shared/data/elpv/"):
            task["root"] = str(Path(args.elpv_root) / Path(task["root"]).name)
    path = work / "stream.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_stream(config: Path, out_dir: Path, extra: Sequence[str]) -> dict[str, Any]:
    """The continual run's ``continual_metrics.json``."""
    import json

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark measures a complete, fresh run
    cmd = [sys.executable, "-m", "anomalib_moleflow", "continual", "--config", str(config), "--run.output_dir", str(out_dir), *extra]
    env = dict(os.environ)
    env.setdefault("MKL_CBWR", "AUTO,STRICT")  # reruns repeat bit for bit (see continual_real.py)
    proc = subprocess.run(cmd, check=False, env=env)  # noqa: S603 - our own interpreter and arguments
    if proc.returncode != 0:
        raise SystemExit(f"continual run failed with exit code {proc.returncode}")
    return json.loads((out_dir / "continual_metrics.json").read_text())


@torch.no_grad()
def test_features(model: MoLEFlow, stream: TaskStream) -> list[torch.Tensor]:
    """Backbone features of every task's test images, task by task."""
    features = []
    for task in range(len(stream)):
        chunks = [model.model.extract_features(model.prepare_batch(b)[0]) for b in loader_of_test_split(stream.datamodule(task))]
        features.append(torch.cat(chunks))
    return features


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three steps and write the results; returns what ``quality.json`` holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    out_dir = Path(args.output_dir)
    work = out_dir.parent / f"{out_dir.name}_inputs"
    work.mkdir(parents=True, exist_ok=True)
    config = stream_config(args, work)
    metrics = run_stream(config, out_dir, args.extra)
    stream = TaskStream(**yaml.safe_load(config.read_text())["data"])
    final = sorted((out_dir / "checkpoints").glob("task_*.ckpt"))[-1]
    model = MoLEFlow.from_checkpoint(final)
    unknown = leave_one_out(model.model, test_features(model, stream), stream.names) if model.model.patch_memory else []
    ceiling: dict[str, dict[str, float]] = {}
    if not args.no_ceiling:
        for task, name in enumerate(stream.names):
            nn = NearestNeighbourCeiling()
            nn.fit(stream.datamodule(task))
            ceiling[name] = nn.evaluate(stream.datamodule(task))
            print(f"ceiling {name}: {ceiling[name]}", flush=True)
    data = {
        "meta": finish_meta({**run_meta("quality.py", argv), "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT")}, start),
        "continual_command": f"python -m anomalib_moleflow continual --config {config}",
        "metrics": metrics,
        "ceiling": ceiling,
        "unknown": unknown,
        "model_config": model.config.to_dict(),
    }
    results = Path(args.results_dir)
    write_results(results, "quality", data, markdown)
    return data


if __name__ == "__main__":
    main()
