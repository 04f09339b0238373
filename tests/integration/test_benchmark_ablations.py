"""Smoke test of ``benchmarks/ablations.py``: two presets on a tiny synthetic stream through the real
command line (``--data-root``/``--tasks``/``--image-size``/``--epochs`` overrides), and the pending
table ``--plan`` writes for every preset without running anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_python

from anomalib_moleflow.data.synthetic import make_stream

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/ablations.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import ablations  # noqa: E402

TASKS = ["red_stripes", "blue_checker"]
PRESET_NAMES = sorted(p.stem for p in (REPO / "anomalib_moleflow" / "configs" / "ablations").glob("*.yaml"))


def test_tiny_run_writes_one_row_per_requested_preset(tmp_path: Path) -> None:
    data_root = make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    results = tmp_path / "results"
    args = [
        "benchmarks/ablations.py", "--only", "v5,default", "--data-root", str(data_root), "--tasks", *TASKS,
        "--image-size", "64", "--epochs", "1", "--output-dir", str(tmp_path / "runs"), "--results-dir", str(results),
        "--", "--data.num_workers", "0", "--data.train_batch_size", "8", "--data.eval_batch_size", "8",
        "--trainer.limit_train_batches", "1",
    ]  # fmt: skip
    proc = run_python(args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((results / "ablations.json").read_text())
    assert data["benchmark"] == "ablations" and data["pending"] is False
    assert data["meta"]["command"].startswith("OMP_NUM_THREADS=1 python benchmarks/ablations.py --only v5,default")
    assert data["settings"]["tasks"] == TASKS
    assert [e["preset"] for e in data["presets"]] == ["v5", "default"]
    for entry in data["presets"]:
        assert entry["exit_code"] == 0 and entry["tasks"] == TASKS
        assert f"ablations/{entry['preset']}.yaml" in entry["continual_command"]
        assert "--model.config.features.image_size 64" in entry["continual_command"]
        assert "--trainer.max_epochs 1 --trainer.later_task_epochs 1" in entry["continual_command"]
        for task in TASKS:
            for key in ablations.METRICS:
                assert 0.0 <= entry["final"][task][key] <= 1.0, (entry["preset"], task, key)
            assert entry["train_seconds"][task] > 0
            params = entry["parameters"][task]
            assert params["trained"] >= params["added"] > 0
        assert entry["parameters"][TASKS[0]]["trained"] > entry["parameters"][TASKS[1]]["trained"]  # task 0 trains the shared flow
        assert {"image_AUROC", "pixel_AUROC", "pixel_AP"} <= set(entry["forgetting"])
    assert [(n["section"], n["reported"]) for n in data["notes_reported"]["v5"]] == ablations.NOTES_REPORTED["v5"]

    md = (results / "ablations.md").read_text()
    assert md == ablations.markdown(data)
    assert data["meta"]["command"] in md and "pending" not in md
    for name in ("v5", "default"):
        row = next(line for line in md.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.count(" / ") >= 6  # per-task cells
    assert "| `v7` |" not in md


def test_plan_lists_every_preset_as_pending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ablations.main(["--plan", "--results-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "ablations.json").read_text())
    assert sorted(e["preset"] for e in data["presets"]) == PRESET_NAMES
    assert all(e["pending"] for e in data["presets"])
    assert set(ablations.NOTES_REPORTED) <= set(PRESET_NAMES)  # no figures for a preset that is gone
    md = (tmp_path / "ablations.md").read_text()
    assert "Real numbers pending" in md and "benchmarks/ablations.py --data-root" in md
    for name in PRESET_NAMES:
        assert f"| `{name}` | pending |" in md
    assert "0.8286" in md and "0.8636" in md  # v1's and V4's figures from the notes


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown preset"):
        ablations.main(["--plan", "--only", "v5,v99", "--results-dir", str(tmp_path)])
