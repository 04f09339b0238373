"""The result tables of a continual run: accuracy matrices, forgetting, files, resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from anomalib_moleflow.continual.results_tables import METRIC_NAMES, ContinualResults

TASKS = ["a", "b", "c"]
# R[t][i] after training task t, on task i (routed).
ROUTED = {
    "image_AUROC": [[0.9], [0.8, 0.95], [0.7, 0.9, 1.0]],
    "pixel_AUROC": [[0.97], [0.96, 0.98], [0.97, 0.98, 0.99]],
    "pixel_AP": [[0.5], [0.6, 0.4], [0.5, 0.45, 0.3]],
    "image_F1": [[0.8], [0.7, 0.9], [0.6, 0.9, 1.0]],
}
ROUTING = [[1.0], [0.98, 1.0], [0.96, 0.99, 1.0]]


def _oracle(metric: str, t: int, i: int) -> float:
    return ROUTED[metric][i][i]  # no forgetting with the true task id


def _fill(results: ContinualResults, after: range) -> None:
    for t in after:
        for i in range(t + 1):
            results.record(t, i, {m: ROUTED[m][t][i] for m in ROUTED} | {"image_F1Score": 0.1}, mode="routed")
            results.record(t, TASKS[i], {m: _oracle(m, t, i) for m in ROUTED}, mode="oracle")
            results.record_routing(t, i, ROUTING[t][i])
        results.record_timing(TASKS[t], 10.0 * (t + 1))
    results.set_inference_ms(12.5)


def test_hand_made_three_tasks(tmp_path: Path) -> None:
    results = ContinualResults(TASKS)
    _fill(results, range(3))
    data = results.to_dict()
    assert list(data) == ["tasks", "matrix", "matrix_oracle", "final", "mean", "forgetting", "timing", "thresholds"]
    assert data["tasks"] == TASKS
    assert set(data["matrix"]) == {"image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1", "routing_accuracy"}
    assert set(data["matrix_oracle"]) == {"image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1"}
    assert data["matrix"]["image_AUROC"] == [[0.9, None, None], [0.8, 0.95, None], [0.7, 0.9, 1.0]]
    assert data["matrix_oracle"]["pixel_AP"] == [[0.5, None, None], [0.5, 0.4, None], [0.5, 0.4, 0.3]]

    assert data["final"]["a"] == {
        "image_AUROC": 0.7, "pixel_AUROC": 0.97, "pixel_AP": 0.5, "image_F1": 0.6, "routing_accuracy": 0.96,
        "oracle": {"image_AUROC": 0.9, "pixel_AUROC": 0.97, "pixel_AP": 0.5, "image_F1": 0.8},
    }  # fmt: skip
    assert list(data["final"]) == TASKS
    mean = data["mean"]
    assert mean["image_AUROC"] == pytest.approx((0.7 + 0.9 + 1.0) / 3)
    assert mean["routing_accuracy"] == pytest.approx((0.96 + 0.99 + 1.0) / 3)
    assert mean["oracle"]["image_AUROC"] == pytest.approx((0.9 + 0.95 + 1.0) / 3)

    forgetting = data["forgetting"]
    assert forgetting["image_AUROC"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)  # 0.125
    assert forgetting["pixel_AUROC"] == pytest.approx(0.0)
    assert forgetting["pixel_AP"] == pytest.approx(((0.6 - 0.5) + (0.4 - 0.45)) / 2)  # best is after task 1
    assert forgetting["image_F1"] == pytest.approx(((0.8 - 0.6) + (0.9 - 0.9)) / 2)
    assert forgetting["oracle"] == pytest.approx({"image_AUROC": 0.0, "pixel_AUROC": 0.0, "pixel_AP": 0.0, "image_F1": 0.0})
    assert data["thresholds"] == {}  # none recorded
    assert data["timing"] == {"train_seconds": {"a": 10.0, "b": 20.0, "c": 30.0}, "inference_ms_per_image": 12.5}

    paths = results.write(tmp_path / "run")
    written = sorted(p.name for p in (tmp_path / "run").iterdir())  # no temporary files left behind
    assert written == ["continual_matrix.csv", "continual_matrix.png", "continual_metrics.json"]
    text = paths["json"].read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded == json.loads(json.dumps(data))
    assert loaded["matrix"]["pixel_AP"][0][1] is None and loaded["matrix"]["pixel_AP"][1][2] is None

    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["after_task", "task", "metric", "mode", "value"]
    assert len(rows) == 6 * 4 + 6 + 6 * 4  # lower triangle: 4 routed metrics + routing + 4 oracle metrics
    assert {"after_task": "c", "task": "a", "metric": "image_AUROC", "mode": "routed", "value": "0.7"} in rows
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_upper_triangle_and_bad_input_rejected() -> None:
    results = ContinualResults(TASKS)
    with pytest.raises(ValueError, match="not trained yet"):
        results.record(0, 1, {"image_AUROC": 0.5})
    with pytest.raises(ValueError, match="mode"):
        results.record(0, 0, {"image_AUROC": 0.5}, mode="both")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown task"):
        results.record_routing("z", 0, 1.0)
    with pytest.raises(ValueError, match="unique"):
        ContinualResults(["a", "a"])


def test_nan_tensor_values_and_single_task(tmp_path: Path) -> None:
    results = ContinualResults(["only"])
    results.record(0, 0, {"image_AUROC": torch.tensor(0.75), "pixel_AUROC": float("nan")})
    data = results.to_dict()
    assert data["final"]["only"]["image_AUROC"] == 0.75
    assert data["final"]["only"]["pixel_AUROC"] is None and data["final"]["only"]["pixel_AP"] is None
    assert data["forgetting"]["image_AUROC"] == 0.0
    assert data["mean"]["pixel_AUROC"] is None
    assert data["timing"] == {"train_seconds": {"only": None}, "inference_ms_per_image": None}
    json.loads(results.write(tmp_path)["json"].read_text())  # strict JSON even with NaN input


def test_partial_run_reports_latest_task() -> None:
    results = ContinualResults(TASKS)
    assert results.to_dict()["final"] == {}
    _fill(results, range(2))
    data = results.to_dict()
    assert list(data["final"]) == ["a", "b"]
    assert data["forgetting"]["image_AUROC"] == pytest.approx(0.9 - 0.8)
    assert data["matrix"]["image_AUROC"][2] == [None, None, None]


def test_resume_round_trip(tmp_path: Path) -> None:
    full = ContinualResults(TASKS)
    _fill(full, range(3))
    partial = ContinualResults(TASKS)
    _fill(partial, range(2))
    partial.write(tmp_path)
    resumed = ContinualResults.from_dict(json.loads((tmp_path / "continual_metrics.json").read_text()))
    assert resumed.to_dict() == partial.to_dict()
    _fill(resumed, range(2, 3))
    assert resumed.to_dict() == full.to_dict()
    again = ContinualResults.from_dict(full.to_dict())
    assert again.to_dict() == full.to_dict()
    assert math.isclose(again.forgetting("image_AUROC"), 0.125)
    with pytest.raises(ValueError, match="3x3"):
        ContinualResults.from_dict({"tasks": TASKS, "matrix": {"image_AUROC": [[0.5]]}})


def test_metric_names_and_index_errors() -> None:
    assert METRIC_NAMES == ("image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1")
    results = ContinualResults(TASKS)
    with pytest.raises(IndexError, match=r"task index 3 is outside \[0, 3\)"):
        results.record(3, 0, {"image_AUROC": 0.5})
    with pytest.raises(KeyError, match=r"unknown task 'z'"):
        results.record_timing("z", 1.0)
    assert results.last_after_task is None and results.forgetting("image_AUROC") is None
    results.record("b", "a", {"image_AUROC": 0.5})  # names and indices address the same cells
    assert results.matrix("image_AUROC")[1] == [0.5, None, None]
    copy = results.matrix("image_AUROC")
    copy[1][0] = 0.0
    assert results.matrix("image_AUROC")[1][0] == 0.5  # matrix() returns a copy
    assert results.last_after_task == 1


def test_write_replaces_earlier_files(tmp_path: Path) -> None:
    results = ContinualResults(TASKS)
    _fill(results, range(1))
    results.write(tmp_path)
    _fill(results, range(1, 2))
    paths = results.write(tmp_path)
    assert json.loads(paths["json"].read_text())["final"].keys() == {"a", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["continual_matrix.csv", "continual_matrix.png", "continual_metrics.json"]


def test_thresholds_are_kept_per_task_and_survive_resume() -> None:
    results = ContinualResults(TASKS)
    fitted = {"image_threshold": 12.5, "image_threshold_normalized": 0.5, "pixel_threshold": None,
              "pixel_threshold_normalized": None, "image_min": 3.0}  # fmt: skip
    results.record_thresholds("b", fitted, fitted_on="held-out training images")
    results.record_thresholds(0, {**fitted, "pixel_threshold": 9.0, "pixel_threshold_normalized": 0.5}, fitted_on="test split")
    results.record_thresholds("c", None, fitted_on="test split")  # not fitted: left out
    data = results.to_dict()
    assert list(data["thresholds"]) == ["a", "b"]  # in task order
    assert data["thresholds"]["b"] == {
        "image_threshold": 12.5, "image_threshold_normalized": 0.5, "pixel_threshold": None,
        "pixel_threshold_normalized": None, "fitted_on": "held-out training images",
    }  # fmt: skip  (other keys dropped)
    assert data["thresholds"]["a"]["pixel_threshold"] == 9.0 and data["thresholds"]["a"]["fitted_on"] == "test split"
    assert ContinualResults.from_dict(json.loads(json.dumps(data))).to_dict() == data
    with pytest.raises(KeyError, match="unknown task 'z'"):
        results.record_thresholds("z", fitted, fitted_on="test split")
