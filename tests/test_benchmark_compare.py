"""Smoke test of ``benchmarks/compare.py`` on a tiny synthetic two-task stream.

Runs the real command's ``main`` (every model, every measurement, the report and plots) with a
tiny MoLE-Flow (64 px, via ``--moleflow-args``), one epoch, one timing run and a small coreset,
so that the benchmark cannot silently rot. Only the bookkeeping is checked, not the numbers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synthetic_mvtec import make_stream

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare
from compare_lib.report import BACKBONE_KEYS, FIGURE_KEYS, MODELS

TASKS = ("red_stripes", "blue_checker")


def tiny_moleflow_args(tiny_config: Mapping[str, Any]) -> str:
    """``--model.config.*`` / trainer / data overrides that make the continual run tiny."""
    model = " ".join(f"--model.config.{key} {value}" for key, value in tiny_config.items())
    return (f"{model} --trainer.max_epochs 1 --trainer.later_task_epochs 1 "
            "--data.train_batch_size 8 --data.eval_batch_size 8 --data.num_workers 0")


def test_compare_end_to_end(tmp_path: Path, tiny_config: Mapping[str, Any]) -> None:
    """Every model in this process (``--in-process``: the same worker functions, without the
    interpreter start-up of six subprocesses, ~27 s instead of ~85 s)."""
    root = make_stream(tmp_path / "data", TASKS, n_train=8)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [
        "--root", str(root), "--categories", *TASKS, "--output", str(out), "--work-dir", str(work),
        f"--moleflow-args={tiny_moleflow_args(tiny_config)}", "--epochs", "1",
        "--timing-repeats", "1", "--timing-warmup", "0", "--coreset-ratio", "0.05",
    ]
    data = compare.main([*argv, "--in-process"])

    saved = json.loads((out / "compare.json").read_text())
    assert saved["meta"]["command"].startswith("python benchmarks/compare.py --root")
    assert saved["meta"]["image_size"] == tiny_config["image_size"]
    assert saved["meta"]["layers"] == ["blocks.2", "blocks.4"]
    assert saved["meta"]["fastflow_epochs"] == [1, 1]
    assert not saved["meta"]["errors"]
    assert set(saved["models"]) == set(MODELS)
    for name, model in saved["models"].items():
        keys = BACKBONE_KEYS if name == "backbone" else FIGURE_KEYS
        missing = [k for k in keys if k not in model]
        assert not missing, (name, missing)
        assert model["latency_ms_b1"] > 0 and model["throughput_b32"] > 0, name
        if name != "backbone":
            assert set(model["final"]) == set(TASKS), name
            assert all(0.0 <= model["final"][t]["image_AUROC"] <= 1.0 for t in TASKS), name
            assert set(model["train_seconds"]) == set(TASKS), name
    assert saved["models"]["moleflow"]["routing_accuracy"] is not None
    assert saved["models"]["fastflow_seq"]["forgetting"]["pixel_AUROC"] is not None
    assert saved["models"]["moleflow"]["params_added_per_task"] > 0
    assert saved["ratios"]["moleflow_latency_over_backbone"] is not None
    assert {t["verdict"] for t in saved["targets"]} <= {"PASS", "MISS"}
    assert len(saved["targets"]) == 8
    assert data["targets"] == saved["targets"]

    md = (out / "compare.md").read_text()
    assert saved["meta"]["command"] in md
    assert "| model | task | image AUROC | pixel AUROC | pixel AP | routing acc. |" in md
    assert "## Targets of the issue" in md and ("PASS" in md or "MISS" in md)
    for name in ("compare_quality.png", "compare_speed.png", "compare_cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_compare_worker_subprocess(tmp_path: Path, tiny_config: Mapping[str, Any]) -> None:
    """The real command's path: each model in its own ``--worker`` subprocess (here the cheap one)."""
    root = make_stream(tmp_path / "data", TASKS, n_train=4)
    out = tmp_path / "out"
    compare.main([
        "--root", str(root), "--categories", *TASKS, "--output", str(out), "--work-dir", str(tmp_path / "work"),
        f"--moleflow-args={tiny_moleflow_args(tiny_config)}", "--models", "backbone",
        "--timing-repeats", "1", "--timing-warmup", "0",
    ])
    saved = json.loads((out / "compare.json").read_text())
    assert set(saved["models"]) == {"backbone"}
    backbone = saved["models"]["backbone"]
    assert all(key in backbone for key in BACKBONE_KEYS)
    assert backbone["peak_rss_mib"] > 50  # the worker's own process: torch is loaded there
    assert {t["verdict"] for t in saved["targets"]} == {"n/a"}
    assert (tmp_path / "work" / "worker_backbone.json").is_file()
