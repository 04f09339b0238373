"""Smoke test of the scale benchmark (``benchmarks/scale.py``): three tiny tasks, tiny model.

Runs the benchmark's command-line entry point end to end (product generation, continual
run, measurements, results files) into ``tmp_path`` and checks the shape of what it writes,
not the numbers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

SCALE_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"
N_TASKS = 3


def load_scale() -> ModuleType:
    """Import ``benchmarks/scale.py`` (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_scale", SCALE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    return load_scale()


def test_products_are_distinct(scale: ModuleType) -> None:
    from synthetic_products import PRODUCTS

    assert len(PRODUCTS) >= 15
    looks = {(s.color, s.pattern, s.period) for s in PRODUCTS.values()}
    assert len(looks) == len(PRODUCTS)
    assert all(s.defect_color != s.color for s in PRODUCTS.values())


def test_scale_benchmark_smoke(scale: ModuleType, tiny_config: Mapping[str, Any], tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    argv = [
        "--tasks", str(N_TASKS), "--train-images", "6", "--test-images", "4", "--epochs", "1",
        "--image-px", "64", "--train-batch-size", "6", "--eval-batch-size", "4", "--warmup", "1",
        "--latency-runs", "2", "--throughput-batch", "6", "--throughput-runs", "1",
        "--model-config", json.dumps(dict(tiny_config)), "--output-dir", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    result = scale.main(argv)

    data = json.loads((out / "scale.json").read_text())
    assert data["meta"]["command"].startswith("python benchmarks/scale.py --tasks 3 ")
    assert data["meta"]["model_config"]["image_size"] == tiny_config["image_size"]
    rows = data["rows"]
    assert [r["n_tasks"] for r in rows] == list(range(1, N_TASKS + 1))
    for row in rows:
        assert set(scale.ROW_KEYS) <= set(row), set(scale.ROW_KEYS) - set(row)
        for key in scale.ROW_KEYS:
            if key == "route_ms_batch1_median" and row["n_tasks"] == 1:
                assert row[key] is None  # no routing with a single expert
            else:
                assert row[key] is not None, (row["n_tasks"], key)
        assert row["latency_ms_batch1_median"] > 0 and row["throughput_img_per_s"] > 0
        assert 0.0 <= row["routing_accuracy"] <= 1.0
        assert row["peak_rss_mib"] >= row["rss_mib"] > 0
        assert row["checkpoint_mib"] > 0 and row["train_seconds"] > 0
    assert rows[0]["params_added"] == rows[0]["params_total"]
    assert all(r["params_added"] > 0 for r in rows[1:])
    assert rows[-1]["params_total"] == sum(r["params_added"] for r in rows)
    assert data["summary"]["latency_ratio_last_vs_1"] is not None
    assert data == json.loads(json.dumps(result))

    md = (out / "scale.md").read_text()
    assert data["meta"]["command"] in md
    assert "Does the cost per task stay flat?" in md and "Train time per task" in md
    assert md.count("\n| ") >= N_TASKS + 1  # header and one row per task count
    with Image.open(out / "scale.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
