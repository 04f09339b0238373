"""The ``anomalib-moleflow`` command line: ``continual`` on a tiny synthetic stream, help, errors."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from support import run_python
from synthetic_mvtec import make_stream

from anomalib_moleflow.cli import main
from anomalib_moleflow.continual import load_run_checkpoint

REPO = Path(__file__).resolve().parents[1]
TASKS = ["red_stripes", "blue_checker"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m anomalib_moleflow ARGS`` in a fresh interpreter (offline, repo on the path)."""
    return run_python(["-m", "anomalib_moleflow", *args], cwd)


def test_console_script_declared() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["anomalib-moleflow"]
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    assert getattr(module, attr) is main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], ["anomalib-moleflow", "continual"]),
        (["continual", "--help"], ["--config", "--data.root", "--data.tasks", "--model.config.lora_rank", "--resume"]),
    ],
)
def test_help(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_config.yaml"
    with pytest.raises(SystemExit) as info:
        main(["continual", "--config", str(missing)])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err
    assert "Traceback" not in err


def test_missing_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code not in (0, None)
    assert "continual" in capsys.readouterr().err


def test_continual_run(tmp_path: Path) -> None:
    """A two-task run through ``python -m anomalib_moleflow continual``: the YAML's
    ``data.root`` is wrong on purpose and overridden with ``--data.root``."""
    data_root = make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    output_dir = tmp_path / "run"
    config = {
        "model": {
            "config": {
                "image_size": 64,
                "n_coupling_blocks": 2,
                "lora_rank": 2,
                "subnet_hidden_ratio": 0.5,
                "dia_hidden_ratio": 0.25,
            }
        },
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

    done = run_cli("continual", "--config", str(config_path), "--data.root", str(data_root), cwd=tmp_path)
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

    checkpoint, state = load_run_checkpoint(output_dir / "checkpoints" / "task_01_blue_checker.ckpt")
    assert state.complete is True
    assert checkpoint["model_config"]["image_size"] == 64
    assert checkpoint["model_config"]["n_coupling_blocks"] == 2
    assert checkpoint["stream"]["root"] == str(data_root)

    # the same command again refuses to overwrite the finished run
    again = run_cli("continual", "--config", str(config_path), "--data.root", str(data_root), cwd=tmp_path)
    assert again.returncode != 0
    assert "already holds checkpoints" in again.stderr and "--resume" in again.stderr
