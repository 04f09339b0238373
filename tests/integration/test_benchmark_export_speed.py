"""Smoke test of the export speed benchmark (``benchmarks/export_speed.py``): two tiny products,
tiny model, one epoch, few timing repeats.

Runs the benchmark's command-line entry point once (products, continual run, ONNX and OpenVINO
export, timing, agreement check) into a temporary folder and checks what it writes: a row for
every backend, the exported graphs routing every image like PyTorch, and the recorded command.
"""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, TINY_CONFIG

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/export_speed.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import export_speed  # noqa: E402

pytestmark = pytest.mark.skipif(
    any(find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime", "openvino")),
    reason="needs onnx, onnxscript, onnxruntime and openvino",
)


@pytest.fixture(scope="module")
def export_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """``export_speed.main`` on two 64 px products, one epoch: (its return value, output folder, work folder)."""
    tmp = tmp_path_factory.mktemp("export_speed")
    out, work = tmp / "results", tmp / "work"
    argv = [
        "--tasks", "2", "--train-images", "6", "--test-images", "4", "--epochs", "1", "--image-px", "64",
        "--stream", "distinct", "--train-batch-size", "6", "--eval-batch-size", "4", "--warmup", "1",
        "--latency-runs", "2", "--throughput-batch", "4", "--throughput-runs", "1", "--threads", "1",
        "--model-config", json.dumps(TINY_CONFIG), "--output-dir", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    return export_speed.main(argv), out, work


def test_results_files_have_every_backend(export_run: tuple[dict[str, Any], Path, Path]) -> None:
    result, out, work = export_run
    data = json.loads((out / "export_speed.json").read_text())
    assert data == json.loads(json.dumps(result))
    (model,) = data["models"]
    assert model["n_products"] == 2 and len(model["products"]) == 2 and model["image_size"] == 64
    assert Path(model["checkpoint"]) == work / "run" / "checkpoints" / f"task_01_{model['products'][1]}.ckpt"
    assert [row["backend"] for row in model["rows"]] == list(export_speed.BACKENDS)
    for row in model["rows"]:
        assert list(row) == list(export_speed.ROW_KEYS)
        assert row["latency_ms_batch1_median"] >= row["latency_ms_batch1_min"] > 0 and row["throughput_img_per_s"] > 0
        assert row["latency_x_floor"] > 0
    assert model["onnx_mib"] > 0 and model["openvino_mib"] > 0 and model["agreement_images"] == 8
    text = (out / "export_speed.md").read_text()
    for backend in export_speed.BACKENDS:
        assert f"| 2 | {backend.replace('_', ' ')} |" in text


def test_exported_graphs_route_like_pytorch(export_run: tuple[dict[str, Any], Path, Path]) -> None:
    rows = {row["backend"]: row for row in export_run[0]["models"][0]["rows"]}
    for backend in ("pytorch", "onnxruntime", "openvino"):
        assert rows[backend]["product_agreement"] == 1.0, backend
        assert 0.0 <= rows[backend]["max_rel_score_diff"] < 1e-3, backend
    assert rows["backbone_pytorch"]["product_agreement"] is None  # the floor routes nothing


def test_the_command_and_settings_are_recorded(export_run: tuple[dict[str, Any], Path, Path]) -> None:
    result, out, _ = export_run
    meta = result["meta"]
    assert "python benchmarks/export_speed.py --tasks 2 --train-images 6 " in meta["command"]
    assert meta["command"].startswith("OMP_NUM_THREADS=1 ") == (meta["OMP_NUM_THREADS"] == "1")
    assert meta["threads"] == 1 and meta["openvino_config"]["INFERENCE_NUM_THREADS"] == 1
    assert meta["settings"]["tasks"] == [2] and meta["model_config"]["features"]["image_size"] == 64
    assert "CPU cores" in meta["machine"] and meta["onnxruntime"] and meta["openvino"]
    assert f"`{meta['command']}`" in (out / "export_speed.md").read_text()
