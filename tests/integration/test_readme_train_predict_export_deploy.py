"""The README's "Train, predict, export, deploy" section, run as written on two tiny products:
``anomalib-moleflow continual``, ``anomalib-moleflow predict``, ``anomalib export --export_type
openvino`` of the run's last task checkpoint, and ``MoLEFlowOpenVINOInferencer`` on one image.

Every command here is checked to appear verbatim in the README, so the section shows what runs.
"""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from helpers import REPO

from anomalib_moleflow import MoLEFlow
from anomalib_moleflow.data.synthetic import make_stream

TASKS = ["red_stripes", "blue_checker"]
TRAIN = (
    "anomalib-moleflow continual --data.root data --data.tasks '[red_stripes, blue_checker]' --run.output_dir run "
    "--trainer.max_epochs 1 --model.config.features.image_size 64 --model.config.features.grid_downsample 1 "
    "--model.config.flow.n_coupling_blocks 2"
)
PREDICT = "anomalib-moleflow predict --model run --data 'data/*/test/*/*.png'"
EXPORT = (
    "anomalib export --model MoLEFlow --export_type openvino "
    "--ckpt_path run/checkpoints/task_01_blue_checker.ckpt --export_root export"
)
DEPLOY = """\
from anomalib_moleflow.models.moleflow.export import MoLEFlowOpenVINOInferencer

inferencer = MoLEFlowOpenVINOInferencer(
    "export/weights/openvino/model.xml", device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}
)
batch = inferencer.predict("data/blue_checker/test/good/000.png")   # a path, an image array or a batch
print(batch.pred_product, batch.pred_score, batch.pred_label)   # ['blue_checker'] [0.04] [False]
"""
_PREFIX = {  # a console script, or what it runs where the script is not on the PATH
    "anomalib-moleflow": ("-m", "anomalib_moleflow"),
    "anomalib": ("-c", "from anomalib.cli.cli import main; main()"),
}


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Train, predict, export, deploy")
    return text[start : text.index("\n## ", start + 1)]


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` in a fresh process in ``cwd``: the venv's console script, one thread, offline."""
    program, *args = shlex.split(command)
    script = Path(sys.executable).parent / program
    argv = [str(script), *args] if script.is_file() else [sys.executable, *_PREFIX[program], *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
    assert done.returncode == 0, f"{command}\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def test_the_readme_shows_these_commands() -> None:
    section = _section()
    for command in (TRAIN, PREDICT, EXPORT):
        assert command in section, command
    assert textwrap.indent(DEPLOY, "   ") in section  # indented under its list item


@pytest.mark.skipif(
    any(find_spec(name) is None for name in ("onnx", "onnxscript", "openvino")), reason="needs onnx, onnxscript and openvino"
)
def test_train_predict_export_deploy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)

    done = _run(TRAIN, tmp_path)
    assert "results written to run" in done.stdout
    checkpoint = tmp_path / "run" / "checkpoints" / "task_01_blue_checker.ckpt"
    assert checkpoint.is_file()

    done = _run(PREDICT, tmp_path)
    assert "predictions written to run/predictions/predictions.csv" in done.stdout
    with (tmp_path / "run" / "predictions" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {row["product"] for row in rows} == set(TASKS)
    assert all(row["product"] == next(t for t in TASKS if f"/{t}/" in row["path"]) for row in rows)

    _run(EXPORT, tmp_path)
    assert (tmp_path / "export" / "weights" / "openvino" / "model.xml").is_file()

    monkeypatch.chdir(tmp_path)  # the snippet's paths are relative; anomalib's inferencer writes its cache here
    namespace: dict[str, object] = {}
    exec(compile(DEPLOY, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    batch = namespace["batch"]
    assert batch.pred_product == ["blue_checker"]  # type: ignore[attr-defined]
    assert "['blue_checker']" in capsys.readouterr().out
    from helpers import read_image

    with torch.no_grad():
        expected = MoLEFlow.from_checkpoint(checkpoint)(read_image(tmp_path / "data/blue_checker/test/good/000.png")[None])
    assert batch.pred_task.tolist() == expected.pred_task.tolist() == [1]  # type: ignore[attr-defined]
    score = torch.as_tensor(batch.pred_score).reshape(-1)  # type: ignore[attr-defined]
    assert torch.allclose(score, expected.pred_score.reshape(-1), rtol=1e-3, atol=1e-5)  # f32: as PyTorch
