"""The routing study (``benchmarks/routing_study.py``) end to end on a tiny synthetic stream, and its
score functions on hand-made statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, TINY_CONFIG, run_python

from anomalib_moleflow.data.synthetic import make_stream

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/<script>.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import routing_study  # noqa: E402
from routing_lib import scores  # noqa: E402

PRODUCTS = ["red_stripes", "blue_checker", "green_dots"]


def _tiny_stream(tmp_path: Path) -> Path:
    make_stream(tmp_path / "data", PRODUCTS, n_train=12, n_good=3, n_defect=3)
    config = {
        "model": {"config": {**TINY_CONFIG, "scoring": {"patch_memory_size": 256}, "routing": {"router_memory_size": 128}}},
        "data": {"root": str(tmp_path / "data"), "tasks": PRODUCTS, "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_routing_study_end_to_end(tmp_path: Path) -> None:
    config = _tiny_stream(tmp_path)
    results = tmp_path / "results"
    args = ["benchmarks/routing_study.py", "--config", str(config), "--mvtec-root", str(tmp_path / "data"), "--seeds", "0", "1",
            "--choose", "red_stripes", "--results-dir", str(results), "--work-dir", str(tmp_path / "work")]  # fmt: skip
    proc = run_python(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((results / "routing_study.json").read_text())
    assert data["meta"]["command"].endswith(" ".join(args[1:]))
    assert data["products"] == PRODUCTS and [run["seed"] for run in data["runs"]] == [0, 1]
    summary = data["summary"]
    assert set(summary["routing"]) == set(scores.ROUTERS) and set(summary["unknown"]) == set(scores.UNKNOWN_SCORES)
    for router, per_product in summary["routing"].items():
        for name in PRODUCTS:  # distinct products: every router sends each image to its own
            assert per_product[name]["all"] == 1.0, (router, name)
    for name in PRODUCTS:
        row = summary["unknown"]["memory median (model default)"][name]
        assert row["AUROC"] > 0.9 and 0.0 <= row["false_rejects@1.5"] <= 1.0
    assert summary["choose"] == ["red_stripes"] and summary["confirm"] == ["blue_checker", "green_dots"]
    text = (results / "routing_study.md").read_text()
    assert "## Routing accuracy" in text and "## Unknown products, leaving one out" in text
    assert "Choose set: red_stripes; confirm set: blue_checker, green_dots" in text


def test_routing_study_rejects_unknown_choose_names(tmp_path: Path) -> None:
    config = _tiny_stream(tmp_path)
    with pytest.raises(SystemExit, match="not products"):
        routing_study.main(["--config", str(config), "--mvtec-root", str(tmp_path / "data"), "--choose", "bottle",
                            "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")])  # fmt: skip


def test_folds_partition_the_images() -> None:
    held = torch.cat([h for _, h in scores.folds(23)])
    assert sorted(held.tolist()) == list(range(23))
    for keep, h in scores.folds(23):
        assert not set(keep.tolist()) & set(h.tolist()) and len(keep) + len(h) == 23


def test_pooled_median_ignores_a_minority_of_patches() -> None:
    features = torch.zeros(1, 4, 4, 3)
    features[0, 0, :3] = 100.0  # 3 of 16 patches are "defective"
    assert torch.equal(scores.pooled(features, "median"), torch.zeros(1, 3))
    assert scores.pooled(features, "mean")[0, 0] > 10


def test_summary_names_the_winner_of_each_set() -> None:
    def run(a: float, b: float) -> dict:
        routing = {r: {"p": {"all": a, "defective": a}, "q": {"all": b, "defective": b}} for r in scores.ROUTERS}
        first, second = list(scores.ROUTERS)[:2]
        routing[second] = {"p": {"all": 1.0, "defective": 1.0}, "q": {"all": 0.0, "defective": 0.0}}
        row = {"AUROC": 0.5, "false_rejects@1.5": 0.0, "caught@1.5": 0.0, "false_rejects@2.0": 0.0, "caught@2.0": 0.0}
        return {"routing": routing, "unknown": {s: {"p": row, "q": row} for s in scores.UNKNOWN_SCORES}}

    summary = routing_study.summarise([run(0.9, 0.9), run(0.8, 0.9)], ["p", "q"], ["p"])
    assert summary["best_router"]["choose"] == list(scores.ROUTERS)[1]  # 1.0 on p
    assert summary["best_router"]["confirm"] == list(scores.ROUTERS)[0]  # first listed of those at 0.9 on q
    assert abs(summary["routing"][list(scores.ROUTERS)[0]]["p"]["all"] - 0.85) < 1e-12
    assert summary["routing"][list(scores.ROUTERS)[0]]["p"]["min_all"] == 0.8
