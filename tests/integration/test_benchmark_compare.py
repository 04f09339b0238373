"""Smoke test of ``benchmarks/compare.py`` on a tiny synthetic two-task stream.

Runs the real command's ``main`` (every model, every measurement, the report and plots) with a
tiny MoLE-Flow (64 px, via ``--moleflow-args``), one epoch, one timing run and a small coreset,
so that the benchmark cannot silently rot; and renders the committed results again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_CONFIG

from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.models.moleflow import MoLEFlowConfig

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/compare.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402
from compare_lib.markdown import markdown  # noqa: E402
from compare_lib.names import BACKBONE_KEYS, FIGURE_KEYS, MODELS  # noqa: E402
from compare_lib.targets import ratios, targets  # noqa: E402

TASKS = ("red_stripes", "blue_checker")
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_moleflow_args() -> str:
    """``--model.config.<group>.<field>`` / trainer / data overrides that make the continual run tiny."""
    model = " ".join(
        f"--model.config.{group}.{key} {value}" for group, fields in TINY_CONFIG.items() for key, value in fields.items()
    )
    return (f"{model} --trainer.max_epochs 1 --trainer.later_task_epochs 1 "
            "--data.train_batch_size 8 --data.eval_batch_size 8 --data.num_workers 0")  # fmt: skip


def test_compare_end_to_end(tmp_path: Path, tiny_config: MoLEFlowConfig) -> None:
    """Every model in this process (``--in-process``: the same worker functions, without the
    interpreter start-up of six subprocesses)."""
    root = make_stream(tmp_path / "data", TASKS, n_train=8)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [
        "--root", str(root), "--categories", *TASKS, "--output", str(out), "--work-dir", str(work),
        f"--moleflow-args={tiny_moleflow_args()}", "--epochs", "1",
        "--timing-repeats", "1", "--timing-warmup", "0", "--coreset-ratio", "0.05",
    ]  # fmt: skip
    data = compare.main([*argv, "--in-process"])

    saved = json.loads((out / "compare.json").read_text())
    meta = saved["meta"]
    assert f"python benchmarks/compare.py --root {root} --categories red_stripes blue_checker" in meta["command"]
    assert meta["command"].endswith("--in-process")
    assert meta["command"].startswith("OMP_NUM_THREADS=1 ") == (meta["OMP_NUM_THREADS"] == "1")
    assert "CPU cores" in meta["machine"] and meta["wall_seconds"] > 0 and meta["peak_rss_mib_self"] > 100
    assert meta["image_size"] == tiny_config.features.image_size == 64
    assert meta["layers"] == ["blocks.2", "blocks.4"]
    assert meta["fastflow_epochs"] == [1, 1]
    assert "--model.config.flow.n_coupling_blocks 2" in meta["moleflow_command"]
    assert not meta["errors"]
    assert set(saved["models"]) == set(MODELS)
    for name, model in saved["models"].items():
        keys = BACKBONE_KEYS if name == "backbone" else FIGURE_KEYS
        missing = [k for k in keys if k not in model]
        assert not missing, (name, missing)
        assert model["latency_ms_b1"] > 0 and model["throughput_b32"] > 0, name
        if name != "backbone":
            assert set(model["final"]) == set(TASKS), name
            for task in TASKS:
                assert all(0.0 <= model["final"][task][m] <= 1.0 for m in ("image_AUROC", "pixel_AUROC", "pixel_AP"))
            assert set(model["train_seconds"]) == set(TASKS), name
    moleflow = saved["models"]["moleflow"]
    assert 0.0 <= moleflow["routing_accuracy"] <= 1.0
    assert moleflow["routing_accuracy"] == pytest.approx(
        sum(moleflow["final"][t]["routing_accuracy"] for t in TASKS) / len(TASKS)
    )
    assert saved["models"]["fastflow_seq"]["forgetting"]["pixel_AUROC"] is not None
    assert moleflow["params_added_per_task"] > 0
    assert saved["ratios"]["moleflow_latency_over_backbone"] == pytest.approx(
        moleflow["latency_ms_b1"] / saved["models"]["backbone"]["latency_ms_b1"]
    )
    assert {t["verdict"] for t in saved["targets"]} <= {"PASS", "MISS"}
    assert len(saved["targets"]) == 8
    assert data["targets"] == saved["targets"]

    md = (out / "compare.md").read_text()
    assert meta["command"] in md
    assert "| model | task | image AUROC | pixel AUROC | pixel AP | routing acc. |" in md
    assert "## Targets" in md and ("PASS" in md or "MISS" in md)
    assert saved["plots"] == ["compare_quality.png", "compare_speed.png", "compare_cost.png"]
    for name in saved["plots"]:
        assert (out / name).read_bytes()[:8] == PNG, name


def test_compare_worker_subprocess(tmp_path: Path) -> None:
    """The real command's path: each model in its own ``--worker`` subprocess (here the cheap one)."""
    root = make_stream(tmp_path / "data", TASKS, n_train=4)
    out = tmp_path / "out"
    compare.main([
        "--root", str(root), "--categories", *TASKS, "--output", str(out), "--work-dir", str(tmp_path / "work"),
        f"--moleflow-args={tiny_moleflow_args()}", "--models", "backbone",
        "--timing-repeats", "1", "--timing-warmup", "0",
    ])  # fmt: skip
    saved = json.loads((out / "compare.json").read_text())
    assert set(saved["models"]) == {"backbone"}
    backbone = saved["models"]["backbone"]
    assert all(key in backbone for key in BACKBONE_KEYS)
    assert backbone["peak_rss_mib"] > 50  # the worker's own process: torch is loaded there
    assert saved["meta"]["peak_rss_mib_children"] > 50  # ... and the parent sees it as its child
    assert {t["verdict"] for t in saved["targets"]} == {"n/a"}
    assert (tmp_path / "work" / "worker_backbone.json").is_file()


def test_committed_results_render_unchanged() -> None:
    """The committed ``results/compare.json`` gives the committed ratios, targets and ``compare.md``."""
    data = json.loads((BENCHMARKS / "results" / "compare.json").read_text())
    assert ratios(data["models"]) == data["ratios"]
    assert targets(data["models"], data["ratios"]) == data["targets"]
    assert markdown(data) == (BENCHMARKS / "results" / "compare.md").read_text()
