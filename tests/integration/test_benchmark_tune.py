"""Smoke test of ``benchmarks/tune.py``: a tiny two-product run through the real command line.

The script runs in a fresh interpreter as ``python benchmarks/tune.py`` (its sibling imports,
the recorded command), with the tiny model given as ``--set`` overrides and an explicit learning
rate; the test checks the results files, the learning rate the optimiser actually used, and the
routing accuracy against the routed forward's ``pred_task`` on the kept checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, TINY_CONFIG, read_image, run_python, task_test_images

from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig

BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # what `python benchmarks/tune.py` sees
    sys.path.insert(0, str(BENCHMARKS))

import tune  # noqa: E402

TASKS = ("red_stripes", "blue_checker")
LR = 1e-3


def tiny_overrides() -> list[str]:
    """:data:`helpers.TINY_CONFIG` as ``--set group.field=value`` arguments."""
    return [
        f"--set={group}.{key}={json.dumps(value)}" for group, fields in TINY_CONFIG.items() for key, value in fields.items()
    ]


@pytest.fixture(scope="module")
def tune_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """``python benchmarks/tune.py`` on two 64 px synthetic products: (its JSON, output folder, work folder)."""
    tmp = tmp_path_factory.mktemp("tune")
    out, work = tmp / "out", tmp / "work"
    args = [
        "benchmarks/tune.py", "--synthetic", "--categories", *TASKS, "--train-images", "8", "--test-images", "4",
        "--image-px", "64", "--epochs", "1", "--later-epochs", "1", "--batch-size", "8", "--num-workers", "0",
        *tiny_overrides(), f"--set=optim.lr={LR}", "--name", "tiny", "--output-dir", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    proc = run_python(args, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "tiny.json").read_text()), out, work


def test_tune_results_file(tune_run: tuple[dict[str, Any], Path, Path]) -> None:
    data, out, _ = tune_run
    meta = data["meta"]
    assert data["benchmark"] == "tune" and data["name"] == "tiny"
    assert meta["command"].startswith("OMP_NUM_THREADS=1 python benchmarks/tune.py --synthetic --categories red_stripes")
    assert "--set=features.image_size=64" in meta["command"] and f"--set=optim.lr={LR}" in meta["command"]
    assert "CPU cores" in meta["machine"] and meta["threads"] == 1 and meta["date"]
    assert meta["wall_seconds"] > 0 and meta["peak_rss_mib_self"] > 100 and meta["peak_rss_mib_children"] >= 0
    assert data["overrides"]["features.image_size"] == 64 and data["overrides"]["optim.lr"] == LR
    assert data["config"]["features"]["image_size"] == 64 and data["config"]["flow"]["n_coupling_blocks"] == 2
    assert data["settings"]["tasks"] == list(TASKS) and data["settings"]["synthetic"] is True
    results = data["results"]
    assert results["tasks"] == list(TASKS)
    for task in TASKS:
        row = results["final"][task]
        for metric in ("image_AUROC", "pixel_AUROC", "pixel_AP", "routing_accuracy"):
            assert 0.0 <= row[metric] <= 1.0, (task, metric)
        assert results["timing"]["train_seconds"][task] > 0
    assert results["forgetting"]["image_AUROC"] is not None

    md = (out / "tiny.md").read_text()
    assert md == tune.markdown(data)
    assert meta["command"] in md and "| red_stripes | " in md and "| **mean** | " in md
    index = (out / "index.md").read_text()
    assert "[tiny](tiny.md)" in index and "red_stripes -> blue_checker" in index


def test_tune_trains_at_the_configured_learning_rate(tune_run: tuple[dict[str, Any], Path, Path]) -> None:
    """The optimiser of every task was built with ``optim.lr`` of the resolved config."""
    data, _, _ = tune_run
    assert data["lr"] == data["config"]["optim"]["lr"] == LR
    assert data["optimizer_lr_per_task"] == [LR, LR]


def test_tune_routing_accuracy_is_that_of_pred_task(tune_run: tuple[dict[str, Any], Path, Path]) -> None:
    """Each task's routing accuracy is the share of its test images whose routed forward
    (``pred_task``) picks its expert, on the final checkpoint."""
    data, _, work = tune_run
    checkpoint = sorted((work / "run" / "checkpoints").glob("task_*.ckpt"))[-1]
    model = MoLEFlow.from_checkpoint(checkpoint)
    for index, task in enumerate(TASKS):
        images = torch.stack([read_image(p) for p in task_test_images(work / "data", task)])
        with torch.no_grad():
            pred_task = model.model(model.prepare_images(images)).pred_task
        assert data["results"]["final"][task]["routing_accuracy"] == pytest.approx((pred_task == index).double().mean().item())


def test_learning_rate_comes_from_the_config_or_an_explicit_set() -> None:
    base = tune.read_continual_config(tune.DEFAULT_CONFIG)
    assert tune.resolve_config(base, []).optim.lr == MoLEFlowConfig().optim.lr
    assert tune.resolve_config(base, [tune.parse_override("optim.lr=5e-4")]).optim.lr == 5e-4
    assert tune.resolve_config(base, [tune.parse_override("lr=3e-4")]).optim.lr == 3e-4  # flat name, as the config takes


def test_overrides_parse_values_and_name_the_run() -> None:
    assert tune.parse_override("flow.context_kernel=3") == ("flow.context_kernel", 3)
    assert tune.parse_override("experts.input_adapter=film") == ("experts.input_adapter", "film")
    assert tune.parse_override("features.layers=[2, 3]") == ("features.layers", [2, 3])
    assert tune.parse_override("routing.unknown_threshold=null") == ("routing.unknown_threshold", None)
    assert tune.default_name([]) == "defaults"
    assert tune.default_name([("flow.context_kernel", 3), ("experts.input_adapter", "film")]) == (
        "flow.context_kernel=3__experts.input_adapter=film"
    )


@pytest.mark.parametrize("bad", ["flow.no_such_field=1", "flow.context_kernel", "flow.context_kernel=4"])
def test_bad_overrides_are_command_line_errors(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown fields, a missing ``=`` and values the config rejects stop before any training."""
    with pytest.raises(SystemExit) as exc:
        tune.main(["--set", bad])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
