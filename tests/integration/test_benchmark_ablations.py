"""Smoke test of ``benchmarks/ablations.py``: two presets on a tiny synthetic stream through the real
command line (``--data-root``/``--tasks``/``--image-size``/``--epochs`` overrides), with the figure
of Baseline 2.0's gate; the figure of Baseline 1.5's alpha from hand-written task logs; and the
pending table ``--plan`` writes for every preset without running anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, run_python
from PIL import Image

from anomalib_moleflow.data.synthetic import make_stream

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/ablations.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import ablation_context
import ablations

TASKS = ["red_stripes", "blue_checker"]
PRESET_NAMES = sorted(p.stem for p in (REPO / "anomalib_moleflow" / "configs" / "ablations").glob("*.yaml"))


def test_tiny_run_writes_one_row_per_requested_preset(tmp_path: Path) -> None:
    data_root = make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    results = tmp_path / "results"
    args = [
        "benchmarks/ablations.py", "--only", "baseline_2_0,default", "--data-root", str(data_root), "--tasks", *TASKS,
        "--image-size", "64", "--epochs", "1", "--output-dir", str(tmp_path / "runs"), "--results-dir", str(results),
        "--", "--data.num_workers", "0", "--data.train_batch_size", "8", "--data.eval_batch_size", "8",
        "--trainer.limit_train_batches", "1",
    ]  # fmt: skip
    proc = run_python(args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((results / "ablations.json").read_text())
    assert data["benchmark"] == "ablations" and data["pending"] is False
    assert data["meta"]["command"].startswith("OMP_NUM_THREADS=1 python benchmarks/ablations.py --only baseline_2_0,default")
    assert data["settings"]["tasks"] == TASKS
    assert [e["preset"] for e in data["presets"]] == ["baseline_2_0", "default"]
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
    assert [(n["section"], n["reported"]) for n in data["notes_reported"]["baseline_2_0"]] == ablations.NOTES_REPORTED["baseline_2_0"]

    md = (results / "ablations.md").read_text()
    assert md == ablations.markdown(data)
    assert data["meta"]["command"] in md and "pending" not in md
    for name in ("baseline_2_0", "default"):
        row = next(line for line in md.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.count(" / ") >= 6  # per-task cells
    assert "| `v7` |" not in md
    # the gate figure of the Baseline 2.0 run (the default preset is not plotted)
    assert data["context_plots"] == {"baseline_2_0": "ablations_context_baseline_2_0.png"}
    assert "`ablations_context_baseline_2_0.png`" in md
    _assert_drawn(results / "ablations_context_baseline_2_0.png")
    assert sorted(p.name for p in results.glob("*.png")) == ["ablations_context_baseline_2_0.png"]


def _assert_drawn(path: Path) -> None:
    """The PNG has the figure's size and more than a blank canvas: coloured lines on it."""
    with Image.open(path) as image:
        assert image.size == (800, 450)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    ink = (pixels < 250).any(axis=-1).mean()
    coloured = (pixels.max(axis=-1) - pixels.min(axis=-1) > 60).mean()  # the block lines, not grey axes
    assert ink > 0.01 and coloured > 0.001, (ink, coloured)


def _write_task_log(run_dir: Path, task: int, name: str, columns: dict[str, list[float]]) -> None:
    """A task's metrics.csv as the Lightning CSV logger writes it: one row per epoch."""
    folder = run_dir / "logs" / f"task_{task:02d}_{name}"
    folder.mkdir(parents=True)
    epochs = len(next(iter(columns.values())))
    lines = [",".join(["epoch", "step", "train_loss_epoch", *columns])]
    lines += [",".join([str(e), str(e), "1.0", *(str(v[e]) for v in columns.values())]) for e in range(epochs)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_alpha_figure_from_the_task_logs(tmp_path: Path) -> None:
    run = tmp_path / "baseline_1_5"
    _write_task_log(run, 0, "bottle", {"context_alpha/block_0": [0.1, 0.11, 0.12], "context_alpha/block_1": [0.1, 0.09, 0.08],
                                       "alpha_mean": [0.1, 0.1, 0.1]})  # fmt: skip
    _write_task_log(run, 1, "transistor", {"context_alpha/block_0": [0.12, 0.13], "context_alpha/block_1": [0.08, 0.07],
                                           "alpha_mean": [0.1, 0.1]})  # fmt: skip
    logs = ablation_context.task_logs(run)
    assert [name for name, _ in logs] == ["bottle", "transistor"] and ablation_context.context_kind(logs) == "alpha"
    plots = ablation_context.context_plots({"baseline_1_5": run}, tmp_path / "results")
    assert plots == {"baseline_1_5": "ablations_context_baseline_1_5.png"}
    _assert_drawn(tmp_path / "results" / "ablations_context_baseline_1_5.png")

    plain = tmp_path / "no_context"
    _write_task_log(plain, 0, "bottle", {"train_nll": [1.0, 0.9]})
    assert ablation_context.context_plots({"default": plain}, tmp_path / "results") == {}


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


def _results(presets: dict[str, dict], overrides: str = "data.root=d", pending: bool = False, command: str = "c0") -> dict:
    return {
        "meta": {"command": command, "date": "d", "machine": "m"},
        "settings": {"stream_config": "s.yaml", "tasks": ["a", "b"], "overrides": overrides},
        "pending": pending,
        "notes_reported": {name: [] for name in presets},
        "presets": [{"preset": name, **entry} for name, entry in presets.items()],
        "context_plots": {},
    }


def test_merge_replaces_the_rows_run_now_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "ablations.json"
    path.write_text(json.dumps(_results({"v1": {"pending": True}, "v2": {"pending": True}, "default": {"pending": True}}, pending=True)))
    first = ablations.merged(path, _results({"default": {"mean": {"image_AUROC": 0.99}}}, command="c1"))
    assert [e["preset"] for e in first["presets"]] == ["v1", "v2", "default"]
    assert first["presets"][2]["mean"]["image_AUROC"] == 0.99 and first["presets"][0]["pending"] is True
    assert first["pending"] is False and first["earlier_commands"] == []  # the plan ran nothing
    path.write_text(json.dumps(first))
    second = ablations.merged(path, _results({"v2": {"mean": {"image_AUROC": 0.9}}}, command="c2"))
    assert second["presets"][2]["mean"]["image_AUROC"] == 0.99 and second["presets"][1]["mean"]["image_AUROC"] == 0.9
    assert second["earlier_commands"] == ["c1"]
    text = ablations.markdown(second)
    assert "**Pending rows** (`v1`)" in text and "`c1`" in text


def test_merge_refuses_other_settings_or_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no earlier results"):
        ablations.merged(tmp_path / "none.json", _results({}))
    path = tmp_path / "ablations.json"
    path.write_text(json.dumps(_results({"v1": {"pending": True}})))
    with pytest.raises(SystemExit, match="other settings"):
        ablations.merged(path, _results({"v1": {}}, overrides="data.root=d, epochs=2"))
