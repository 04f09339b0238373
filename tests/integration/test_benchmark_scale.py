"""Smoke test of the scale benchmark (``benchmarks/scale.py``): three tiny tasks, tiny model.

Runs the benchmark's command-line entry point once (product generation, continual run,
measurements, results files) into a temporary folder, checks what it writes, recomputes the
routing accuracy from the routed forward's ``pred_task`` on the kept checkpoint, profiles that
checkpoint with ``benchmarks/profile_inference.py``, and renders the committed results again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, TINY_CONFIG, read_image, task_test_images
from PIL import Image

from anomalib_moleflow.data.synthetic import LOOKALIKE_PRODUCTS, PRODUCTS
from anomalib_moleflow.models.moleflow import MoLEFlow

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/scale.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import profile_inference  # noqa: E402
import scale  # noqa: E402
from scale_lib.report import markdown, summarize  # noqa: E402

N_TASKS = 3


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """``scale.main`` on three 64 px products, one epoch each: (its return value, output folder, work folder)."""
    tmp = tmp_path_factory.mktemp("scale")
    out, work = tmp / "results", tmp / "work"
    argv = [
        "--tasks", str(N_TASKS), "--train-images", "6", "--test-images", "4", "--epochs", "1",
        "--image-px", "64", "--train-batch-size", "6", "--eval-batch-size", "4", "--warmup", "1",
        "--latency-runs", "2", "--throughput-batch", "6", "--throughput-runs", "1",
        "--model-config", json.dumps(TINY_CONFIG), "--output-dir", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    return scale.main(argv), out, work


def test_products_are_distinct() -> None:
    assert len(PRODUCTS) >= 15
    looks = {(s.color, s.pattern, s.period) for s in PRODUCTS.values()}
    assert len(looks) == len(PRODUCTS)
    assert all(s.defect_color != s.color for s in PRODUCTS.values())


def test_scale_results_files(scale_run: tuple[dict[str, Any], Path, Path]) -> None:
    result, out, _ = scale_run
    data = json.loads((out / "scale.json").read_text())
    assert data == json.loads(json.dumps(result))
    meta = data["meta"]
    assert "python benchmarks/scale.py --tasks 3 --train-images 6 " in meta["command"]
    assert meta["command"].startswith("OMP_NUM_THREADS=1 ") == (meta["OMP_NUM_THREADS"] == "1")
    assert meta["model_config"]["features"]["image_size"] == 64 and meta["threads"] == 1
    assert meta["settings"]["stream"] == "lookalike"  # the default stream
    assert meta["tasks"] == list(LOOKALIKE_PRODUCTS)[:N_TASKS]
    assert meta["wall_minutes"] == pytest.approx(meta["wall_seconds"] / 60) and meta["peak_rss_mib_self"] > 100
    rows = data["rows"]
    assert [r["n_tasks"] for r in rows] == list(range(1, N_TASKS + 1))
    for row in rows:
        assert list(row) == list(scale.ROW_KEYS)
        for key in scale.ROW_KEYS:
            if key.startswith("route_ms") and row["n_tasks"] == 1:
                assert row[key] is None  # no routing with a single expert
            else:
                assert row[key] is not None, (row["n_tasks"], key)
        assert row["latency_ms_batch1_median"] >= row["latency_ms_batch1_min"] > 0 and row["throughput_img_per_s"] > 0
        assert 0.0 <= row["routing_accuracy"] <= 1.0 and len(row["routing_accuracy_per_task"]) == row["n_tasks"]
        assert 1 <= row["experts_in_batch"] <= row["n_tasks"]
        if row["n_tasks"] > 1:
            assert row["route_ms_interleaved_all"] > 0 and row["route_ms_interleaved_2"] > 0
        assert row["peak_rss_mib"] >= row["rss_mib"] > 0
        assert row["checkpoint_mib"] > 0 and row["train_seconds"] > 0
    assert rows[0]["experts_in_batch"] == 1
    assert rows[0]["params_added"] == rows[0]["params_total"]
    assert all(r["params_added"] == r["expert_params"] > 0 for r in rows[1:])  # a later task adds its expert only
    assert rows[-1]["params_total"] == sum(r["params_added"] for r in rows)
    assert data["summary"] == summarize(rows)
    assert data["summary"]["latency_ratio_last_vs_1"] == pytest.approx(
        rows[-1]["latency_ms_batch1_median"] / rows[0]["latency_ms_batch1_median"]
    )

    md = (out / "scale.md").read_text()
    assert md == markdown(data)
    assert meta["command"] in md
    assert "Does the cost per task stay flat?" in md and "Train time per task" in md
    assert md.count("\n| ") >= N_TASKS + 1  # header and one row per task count
    with Image.open(out / "scale.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_scale_routing_accuracy_is_that_of_pred_task(scale_run: tuple[dict[str, Any], Path, Path]) -> None:
    """The last row's per-task routing accuracy is the share of each task's test images whose
    routed forward (``pred_task``) picks that task's expert, on the final checkpoint."""
    result, _, work = scale_run
    checkpoint = sorted((work / "run" / "checkpoints").glob("task_*.ckpt"))[-1]
    model = MoLEFlow.from_checkpoint(checkpoint)
    accuracy = []
    for index, task in enumerate(result["meta"]["tasks"]):
        images = torch.stack([read_image(p) for p in task_test_images(work / "data", task)])
        with torch.no_grad():
            pred_task = model.model(model.prepare_images(images)).pred_task
        accuracy.append((pred_task == index).double().mean().item())
    assert result["rows"][-1]["routing_accuracy_per_task"] == pytest.approx(accuracy)


def test_profile_inference_on_the_scale_checkpoint(scale_run: tuple[dict[str, Any], Path, Path], tmp_path: Path) -> None:
    _, _, work = scale_run
    checkpoint = sorted((work / "run" / "checkpoints").glob("task_*.ckpt"))[-1]
    text = profile_inference.main([str(checkpoint), "--repeats", "2", "--output-dir", str(tmp_path)])
    assert (tmp_path / "profile_inference.md").read_text() == text
    assert f"python benchmarks/profile_inference.py {checkpoint} --repeats 2" in text
    assert "| base flow (2 coupling blocks, merged LoRA) |" in text and "| whole routed forward |" in text
    assert "Self CPU time total" in text


@pytest.mark.parametrize("folder", ["results", "results/scale_lookalike"])
def test_committed_results_render_unchanged(folder: str) -> None:
    """The committed ``scale.json`` of each stream gives the committed summary and ``scale.md``."""
    data = json.loads((BENCHMARKS / folder / "scale.json").read_text())
    assert summarize(data["rows"]) == data["summary"]
    assert markdown(data) == (BENCHMARKS / folder / "scale.md").read_text()


def test_first_tasks_router_knows_only_the_first_tasks_and_leaves_the_original() -> None:
    from scale_lib.measure import first_tasks_router

    from anomalib_moleflow.models.moleflow.routing import TaskRouter

    router = TaskRouter(4, metric="euclidean")
    for t in range(4):
        router.fit(str(t), torch.randn(6, 4) + 10 * t)
    restricted = first_tasks_router(router, 2)
    assert restricted.task_keys == ["0", "1"] and restricted.n_fitted == 2
    assert router.task_keys == ["0", "1", "2", "3"] and router.n_fitted == 4
    far = torch.full((1, 4), 30.0)  # nearest to task 3
    assert int(router(far, None)) == 3 and int(restricted(far, None)) == 1
