"""``anomalib-moleflow continual``: a run on a tiny synthetic stream, its help, config and data errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_CONFIG, run_python

from anomalib_moleflow.cli import build_parser, continual_parser, format_summary, main
from anomalib_moleflow.continual.results_tables import ContinualResults
from anomalib_moleflow.continual.run_checkpoint import load_run_checkpoint
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig

TASKS = ["red_stripes", "blue_checker"]
CONFIGS = REPO / "anomalib_moleflow" / "configs" / "continual"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m anomalib_moleflow ARGS`` in a fresh interpreter (offline, repo on the path)."""
    return run_python(["-m", "anomalib_moleflow", *args], cwd)


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_config.yaml"
    assert main(["continual", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err
    assert "Traceback" not in err


def test_unknown_config_field_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["continual", "--data.tasks", "[bottle]", "--model.config.experts.lora_rnk", "4"]) == 2
    err = capsys.readouterr().err
    assert "lora_rnk" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["mvtec_real", "mvtec15_original", "mvtec15_alphabetical"])
def test_shipped_configs_parse(name: str) -> None:
    """Each shipped config (and a grouped override on top) builds the runner's objects."""
    parser = build_parser()
    cfg = parser.parse_args(["continual", "--config", str(CONFIGS / f"{name}.yaml"), "--model.config.flow.n_coupling_blocks", "6"])
    init = continual_parser().instantiate_classes(cfg.continual)
    assert isinstance(init.model.config, MoLEFlowConfig)
    assert init.model.config == MoLEFlowConfig().updated({"flow.n_coupling_blocks": 6})
    assert len(init.data) == (2 if name == "mvtec_real" else 15)
    assert init.trainer.max_epochs == 16 and init.run.output_dir == f"results/continual/{name}"


def test_bad_data_root_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong ``--data.root`` fails before any model is built, naming the folder, without a traceback."""
    missing = tmp_path / "no_such_root"
    output_dir = tmp_path / "run"
    code = main(["continual", "--data.tasks", "[bottle]", "--data.root", str(missing), "--run.output_dir", str(output_dir)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("anomalib-moleflow continual: error: ")
    assert str(missing) in err and "task 0 'bottle'" in err
    assert "Traceback" not in err
    assert not output_dir.exists()


def test_format_summary_of_a_partial_run() -> None:
    results = ContinualResults(["a", "b"])
    results.record(0, 0, {"image_AUROC": 0.875, "pixel_AUROC": 0.5, "image_F1": 0.8})
    results.record_routing(0, 0, 1.0)
    results.record_timing("a", 2.5)
    results.record_thresholds("a", {"image_threshold": 12.25, "image_threshold_normalized": 0.5}, fitted_on="the test split")
    lines = format_summary(results.to_dict()).splitlines()
    assert lines[0].split() == ["task", "image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1", "routing_accuracy"]
    assert lines[1].split() == ["a", "0.8750", "0.5000", "-", "0.8000", "1.0000"]
    assert lines[2].split() == ["b", "-", "-", "-", "-", "-"]  # not trained yet
    assert lines[3].split() == ["mean", "0.8750", "0.5000", "-", "0.8000", "1.0000"]
    assert lines[4].split() == ["forgetting", "0.0000", "0.0000", "0.0000", "0.0000"]  # one task so far: nothing forgotten
    assert lines[5] == 'train seconds per task: {"a": 2.5, "b": null}; inference - ms/image'
    assert lines[6].split() == ["threshold", "image", "raw", "(normalised)", "pixel", "raw", "(normalised)"]
    assert lines[7].split() == ["a", "12.2500", "(0.5000)", "-"]  # no pixel threshold fitted
    assert lines[8] == "thresholds of a fitted on the test split"
    assert len(lines) == 9


def test_continual_run(tmp_path: Path) -> None:
    """A two-task run through ``python -m anomalib_moleflow continual``: the YAML's
    ``data.root`` is wrong on purpose and overridden with ``--data.root``, and a grouped model
    field is overridden as ``--model.config.<group>.<field>``."""
    data_root = make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    output_dir = tmp_path / "run"
    config = {
        "model": {"config": TINY_CONFIG},
        "data": {
            "root": str(tmp_path / "wrong_root"),
            "tasks": TASKS,
            "train_batch_size": 8,
            "eval_batch_size": 8,
            "num_workers": 0,
        },
        "trainer": {"max_epochs": 1, "limit_train_batches": 1},
        "run": {"output_dir": str(output_dir)},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    args = ("continual", "--config", str(config_path), "--data.root", str(data_root), "--model.config.experts.lora_rank", "3")

    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((output_dir / "continual_metrics.json").read_text())
    assert metrics["tasks"] == TASKS
    assert set(metrics["final"]) == set(TASKS)
    assert (output_dir / "continual_matrix.csv").is_file()
    assert (output_dir / "continual_matrix.png").is_file()
    assert f"results written to {output_dir}" in done.stdout
    table = done.stdout[: done.stdout.index("results written to")].splitlines()
    for name in TASKS:  # one row per task with its final routing accuracy
        row = next(line for line in table if line.startswith(name))
        assert f"{metrics['final'][name]['routing_accuracy']:.4f}" in row
    mean_row = next(line for line in table if line.startswith("mean"))
    assert f"{metrics['mean']['image_AUROC']:.4f}" in mean_row

    last = output_dir / "checkpoints" / "task_01_blue_checker.ckpt"
    checkpoint, state = load_run_checkpoint(last)
    assert state.complete is True
    saved = checkpoint["hyper_parameters"]["config"]
    assert saved["features"]["image_size"] == 64
    assert saved["flow"]["n_coupling_blocks"] == 2
    assert saved["experts"]["lora_rank"] == 3  # the command-line override
    assert MoLEFlowConfig.from_dict(saved) == MoLEFlowConfig.from_dict(TINY_CONFIG).updated({"experts.lora_rank": 3})
    assert checkpoint["stream"]["root"] == str(data_root)
    model = MoLEFlow.from_checkpoint(last)
    assert model.model.task_names == TASKS and model.config.experts.lora_rank == 3

    # the same command again refuses to overwrite the finished run
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode != 0
    assert "already holds checkpoints" in again.stderr and "--resume" in again.stderr
    assert str(output_dir) in again.stderr and "Traceback" not in again.stderr
