"""The quality benchmark (``benchmarks/quality.py``) end to end on a tiny synthetic stream, and the
seed / thread-count spread of ``benchmarks/continual_real.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from helpers import REPO, TINY_CONFIG, run_python

from anomalib_moleflow.data.synthetic import make_stream

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/<script>.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import continual_real  # noqa: E402

PRODUCTS = ["red_stripes", "blue_checker", "green_dots"]


def test_quality_benchmark_end_to_end(tmp_path: Path) -> None:
    make_stream(tmp_path / "data", PRODUCTS, n_train=12, n_good=3, n_defect=3)
    config = {
        "model": {"config": {**TINY_CONFIG, "scoring": {"patch_memory_size": 256}, "routing": {"router_memory_size": 128}}},
        "data": {"root": str(tmp_path / "data"), "tasks": PRODUCTS, "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0},
        "trainer": {"max_epochs": 1},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    args = ["benchmarks/quality.py", "--config", str(tmp_path / "tiny.yaml"), "--mvtec-root", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "run"), "--results-dir", str(results)]  # fmt: skip
    proc = run_python(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((results / "quality.json").read_text())
    assert data["meta"]["command"].endswith(" ".join(args[1:])) and data["meta"]["MKL_CBWR"]
    assert data["metrics"]["tasks"] == PRODUCTS
    for name in PRODUCTS:
        ceiling = data["ceiling"][name]
        assert 0.5 <= ceiling["image_AUROC"] <= 1.0 and 0.5 <= ceiling["pixel_AUROC"] <= 1.0
        assert data["metrics"]["final"][name]["routing_accuracy"] == 1.0  # distinct products
    assert [row["unknown_product"] for row in data["unknown"]] == PRODUCTS
    for row in data["unknown"]:
        assert row["AUROC"] > 0.9  # distinct products: an unseen one is easy to tell
        assert row["known_images"] == 12 and row["unknown_images"] == 6
    text = (results / "quality.md").read_text()
    assert "| red_stripes |" in text and "## Unknown products (leave one out)" in text and "chosen on" in text


def _run(seed: int, threads: int, bottle: float) -> dict:
    row = {"image_AUROC": bottle, "pixel_AUROC": 0.97, "pixel_AP": 0.6, "routing_accuracy": 1.0}
    return {"seed": seed, "threads": threads, "metrics": {"tasks": ["bottle"], "final": {"bottle": row}, "mean": row}}


def test_spread_over_seeds_and_threads() -> None:
    runs = [_run(0, 1, 0.99), _run(1, 1, 1.0), _run(0, 2, 0.98)]
    spread = continual_real.spread(runs)
    stats = spread["bottle"]["image_AUROC"]
    assert stats["n"] == 3 and stats["min"] == 0.98 and stats["max"] == 1.0
    assert abs(stats["mean"] - 0.99) < 1e-12 and abs(stats["sd"] - 0.01) < 1e-12
    assert spread["mean"]["pixel_AUROC"]["sd"] < 1e-12
    meta = {"command": "python benchmarks/continual_real.py --seeds 0 1", "date": "d", "machine": "m"}
    metrics = {**runs[0]["metrics"], "forgetting": {"image_AUROC": 0.0}, "timing": {"train_seconds": {"bottle": 1.0},
               "inference_ms_per_image": 1.0}}  # fmt: skip
    metrics["final"]["bottle"]["oracle"] = {"image_AUROC": 0.99}
    metrics["mean"] = {**metrics["final"]["bottle"]}
    text = continual_real.markdown({"meta": meta, "metrics": metrics, "runs": runs, "spread": spread})
    assert "## 3 runs: seeds and torch thread counts" in text and "0.9900 +- 0.0100 [0.9800, 1.0000]" in text
