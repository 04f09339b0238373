"""``anomalib-moleflow predict`` on a tiny two-product run: every image of a folder mixing both
products' test images gets its product, scores, label and overlay; the errors are one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIG, run_python, task_test_images
from PIL import Image

from anomalib_moleflow.cli import SUBCOMMANDS, main
from anomalib_moleflow.data.synthetic import make_stream

TASKS = ["red_stripes", "blue_checker"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-task run (``anomalib-moleflow continual``, one epoch)."""
    tmp = tmp_path_factory.mktemp("predict_run")
    root = make_stream(tmp / "data", TASKS, n_train=12, n_good=3, n_defect=3)
    output = tmp / "run"
    args = ["continual", "--data.root", str(root), "--data.tasks", json.dumps(TASKS), "--data.train_batch_size", "8",
            "--data.eval_batch_size", "8", "--data.num_workers", "0", "--trainer.max_epochs", "1",
            "--run.output_dir", str(output)]  # fmt: skip
    for group, fields in TINY_CONFIG.items():
        for field, value in fields.items():
            args += [f"--model.config.{group}.{field}", str(value)]
    assert main(args) == 0
    return output


@pytest.fixture(scope="module")
def mixed(run_dir: Path) -> dict[str, str]:
    """A folder with both products' test images, named alike (``good/000_<product>.png``): path -> product."""
    root, folder = run_dir.parent / "data", run_dir.parent / "mixed_test_images"
    truth = {}
    for name in TASKS:
        for path in task_test_images(root, name):
            target = folder / path.parent.name / f"{path.stem}_{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            truth[str(target)] = name
    return truth


def test_predict_is_a_subcommand() -> None:
    assert SUBCOMMANDS["predict"].HELP


def test_results_show_the_thresholds_and_the_f1(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "continual_metrics.json").read_text())
    assert list(metrics["thresholds"]) == TASKS
    for name in TASKS:
        values = metrics["thresholds"][name]
        assert (
            isinstance(values["image_threshold"], float)
            and values["image_threshold_normalized"] == 0.5
        )
        assert (
            isinstance(values["pixel_threshold"], float)
            and values["pixel_threshold_normalized"] == 0.5
        )  # masks
        assert values["fitted_on"].startswith("the test split")
        assert 0.0 <= metrics["final"][name]["image_F1"] <= 1.0
        assert 0.0 <= metrics["final"][name]["oracle"]["image_F1"] <= 1.0


def test_predict_a_folder_of_mixed_products(
    run_dir: Path, mixed: dict[str, str]
) -> None:
    # the command of the README's "Continual runs" section, in the folder that holds the run and the images
    assert run_dir.name == "run" and (run_dir.parent / "mixed_test_images").is_dir()
    command = "python -m anomalib_moleflow predict --model run --data mixed_test_images"
    done = run_python(command.split()[1:], cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    out = run_dir / "predictions"  # the default output folder of a run
    assert "predictions written to run/predictions/predictions.csv" in done.stdout
    mixed = {
        str(Path(path).relative_to(run_dir.parent)): name
        for path, name in mixed.items()
    }  # paths as given
    assert "predict" in done.stderr  # the progress bar
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(mixed)
    assert {
        row["path"]: row["product"] for row in rows
    } == mixed  # separable products: all routed right
    metrics = json.loads((run_dir / "continual_metrics.json").read_text())
    for row in rows:
        threshold = metrics["thresholds"][row["product"]]["image_threshold"]
        assert (
            float(row["threshold_raw"]) == pytest.approx(threshold)
            and float(row["threshold"]) == 0.5
        )
        assert row["label"] == ("anomalous" if float(row["score"]) > 0.5 else "normal")
        assert (float(row["score_raw"]) > threshold) == (row["label"] == "anomalous")
        overlay = run_dir.parent / row["overlay"]
        picture = np.asarray(Image.open(overlay).convert("RGB"))
        assert overlay.parent.parent == out / "overlays"
        assert picture.shape == (256, 512, 3) and picture.std() > 10  # not blank
    data = json.loads((out / "predictions.json").read_text())
    assert data["products"] == TASKS and data["model"].endswith(
        "task_01_blue_checker.ckpt"
    )
    assert {
        name: v["image_threshold"] for name, v in data["thresholds"].items()
    } == pytest.approx(
        {name: v["image_threshold"] for name, v in metrics["thresholds"].items()}
    )
    assert [r["product"] for r in data["rows"]] == [r["product"] for r in rows]


def test_predict_options_and_unknown_products(
    run_dir: Path, mixed: dict[str, str], tmp_path: Path
) -> None:
    first = min(mixed)
    args = [
        "predict",
        "--model",
        str(run_dir / "checkpoints" / "task_01_blue_checker.ckpt"),
        "--data",
        first,
    ]
    assert (
        main(
            [
                *args,
                "--output",
                str(tmp_path / "a"),
                "--overlays",
                "false",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    assert not (tmp_path / "a" / "overlays").exists()
    with (tmp_path / "a" / "predictions.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["product"] == mixed[first] and row["overlay"] == ""
    assert (
        main(
            [
                *args,
                "--output",
                str(tmp_path / "b"),
                "--unknown-threshold",
                "1e-9",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert data["unknown_threshold"] == 1e-9
    assert [(r["product"], r["label"], r["score"]) for r in data["rows"]] == [
        ("unknown", "unknown", None)
    ]


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err
    assert (
        err.startswith("anomalib-moleflow predict: error: ")
        and len(err.strip().splitlines()) == 1
    ), err
    assert "Traceback" not in err and all(needle in err for needle in needles), err


def test_errors_are_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_run"
    assert main(["predict", "--model", str(missing), "--data", str(tmp_path)]) == 1
    _one_line_error(capsys, "--model", str(missing))
    assert (
        main(["predict", "--model", str(run_dir), "--data", str(tmp_path / "*.png")])
        == 1
    )
    _one_line_error(capsys, "no images matched --data", str(tmp_path / "*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    args = [
        "predict",
        "--model",
        str(run_dir),
        "--data",
        str(broken),
        "--output",
        str(tmp_path / "out"),
        "--progress",
        "false",
    ]
    assert main(args) == 1
    _one_line_error(capsys, "cannot read image", str(broken))
    single = run_dir / "checkpoints" / "task_00_red_stripes.ckpt"
    assert (
        main(
            [
                "predict",
                "--model",
                str(single),
                "--data",
                str(broken),
                "--unknown-threshold",
                "1.5",
            ]
        )
        == 1
    )
    _one_line_error(
        capsys,
        "--unknown-threshold needs a model that routes among two or more products",
    )
