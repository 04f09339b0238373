"""Checkpoints written before the layered package still load, and score bit-identically.

``tests/fixtures/legacy_v1/`` (see its ``make_fixture.py``) holds what the code of commit dbf19f2
wrote: a continual run checkpoint in format 1 (``model_config`` / ``state_dict`` / ``task_keys`` at
the top level, flat config) after two tasks, a single-task checkpoint of anomalib's ``Engine`` (flat
config in ``hyper_parameters``), and ``expected.pt``: the scores that code gave on ``inputs``. The
stored files leave out the frozen pretrained backbone (it equals the packaged weights); the tests
put it back, write the full legacy file, and load it with today's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO

from anomalib_moleflow.continual.results_tables import ContinualResults
from anomalib_moleflow.continual.run_checkpoint import FORMAT_KEY, load_run_checkpoint
from anomalib_moleflow.continual.runner import (
    ContinualRunner,
    RunOptions,
    TrainerOptions,
)
from anomalib_moleflow.continual.task_stream import TaskStream
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.io import safe_torch_load
from anomalib_moleflow.models.moleflow import MoLEFlow
from anomalib_moleflow.models.moleflow.checkpoint_format import saved_settings

FIXTURES = REPO / "tests" / "fixtures" / "legacy_v1"
BACKBONE = "model.feature_extractor.backbone."
TASKS = ("red_stripes", "blue_checker")


def _with_backbone(name: str, target: Path) -> Path:
    """Write fixture ``name`` to ``target`` with the packaged backbone weights put back."""
    checkpoint = safe_torch_load(FIXTURES / name)
    assert not any(k.startswith(BACKBONE) for k in checkpoint["state_dict"])
    packaged = MoLEFlow(config=saved_settings(checkpoint).config).state_dict()
    backbone = {k: v for k, v in packaged.items() if k.startswith(BACKBONE)}
    assert backbone
    checkpoint["state_dict"] = {**checkpoint["state_dict"], **backbone}
    torch.save(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def images(expected: dict[str, torch.Tensor]) -> torch.Tensor:
    return expected["inputs"].float() / 255.0


@pytest.fixture(scope="module")
def continual_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_backbone("continual_task_01.ckpt", tmp_path_factory.mktemp("legacy") / "task_01_blue_checker.ckpt")


@pytest.fixture(scope="module")
def continual(continual_path: Path) -> MoLEFlow:
    return MoLEFlow.from_checkpoint(continual_path)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> MoLEFlow:
    return MoLEFlow.from_checkpoint(_with_backbone("single_task.ckpt", tmp_path_factory.mktemp("legacy") / "single.ckpt"))


def test_fixture_is_what_the_old_code_wrote() -> None:
    checkpoint = safe_torch_load(FIXTURES / "continual_task_01.ckpt")
    assert checkpoint[FORMAT_KEY] == 1 and checkpoint["task_keys"] == ["0", "1"]
    assert "hyper_parameters" not in checkpoint and "lora_rank" in checkpoint["model_config"]  # flat config
    single = safe_torch_load(FIXTURES / "single_task.ckpt")
    assert "lora_rank" in single["hyper_parameters"]["config"] and single["moleflow_task_keys"] == ["0"]


def test_continual_settings(continual: MoLEFlow) -> None:
    assert not continual.training
    assert continual.normalize_scores and continual.model.normalizes_scores  # format 1 normalised per task
    assert continual.model.task_keys == ["0", "1"]
    assert continual.model.task_names == ["0", "1"]  # format 1 stored no names: they are the keys
    assert continual.model.active_task == "1"
    assert continual.config.features.layers == (1, 2) and continual.config.experts.lora_rank == 2
    assert continual.model.routing_active


def test_continual_routed_scores_are_bit_identical(
    continual: MoLEFlow, images: torch.Tensor, expected: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        out = continual(images)
    assert torch.equal(out.pred_score, expected["continual_routed_pred_score"])
    assert torch.equal(out.anomaly_map, expected["continual_routed_anomaly_map"])
    assert torch.equal(out.pred_task, expected["continual_route"])
    assert out.pred_task.tolist() == [0] * 6 + [1] * 6  # each product reaches its own expert


def test_continual_raw_oracle_scores_are_bit_identical(
    continual: MoLEFlow, images: torch.Tensor, expected: dict[str, torch.Tensor]
) -> None:
    m = continual
    with torch.no_grad():
        features = m.model.extract_features(m.pre_processor.transform(images))
        with m.model.raw_scores():
            for key in ("0", "1"):
                with m.model.oracle(key):
                    raw = m.model.predict_features(features)
                assert torch.equal(raw.pred_score, expected[f"continual_raw_{key}_pred_score"]), key
                assert torch.equal(raw.anomaly_map, expected[f"continual_raw_{key}_anomaly_map"]), key
                assert torch.equal(raw.pred_task, torch.full((len(images),), int(key))), key
    assert m.model.normalizes_scores  # restored after the block


def test_single_task_raw_scores_are_bit_identical(
    single: MoLEFlow, images: torch.Tensor, expected: dict[str, torch.Tensor]
) -> None:
    assert not single.normalize_scores and single.model.task_keys == ["0"] and single.model.task_names == ["0"]
    with torch.no_grad():
        raw = single.model(single.pre_processor.transform(images))
    assert torch.equal(raw.pred_score, expected["single_pred_score"])
    assert torch.equal(raw.anomaly_map, expected["single_anomaly_map"])


def test_format_1_run_checkpoint_reads(continual_path: Path) -> None:
    checkpoint, state = load_run_checkpoint(continual_path, expected_tasks=list(TASKS))
    assert checkpoint[FORMAT_KEY] == 1
    assert state.task_names == list(TASKS) and state.completed_tasks == 2 and state.complete
    assert ContinualResults.from_dict(checkpoint["results"]).tasks == list(TASKS)


def test_format_1_run_resumes(
    continual_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected: dict[str, torch.Tensor]
) -> None:
    """A continual run resumes from its format-1 checkpoint: the run is complete, so nothing trains,
    and the runner's model and results are the checkpoint's."""
    checkpoint = safe_torch_load(continual_path)
    root = make_stream(tmp_path / "data", TASKS, n_train=16)  # the fixture's data (same images)
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "checkpoints" / continual_path.name).write_bytes(continual_path.read_bytes())

    def no_training(self: ContinualRunner, task: int) -> float:
        raise AssertionError(f"training of task {task} started")

    monkeypatch.setattr(ContinualRunner, "train_task", no_training)
    stream = TaskStream(list(TASKS), root=str(root), train_batch_size=8, eval_batch_size=8, num_workers=0)
    runner = ContinualRunner(
        saved_settings(checkpoint).config, stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(output_dir))
    )
    results = runner.run(resume=True)
    assert runner.run_state.complete and runner.run_state.completed_tasks == 2
    assert results.to_dict() == ContinualResults.from_dict(checkpoint["results"]).to_dict()
    assert runner.model is not None and runner.model.model.task_keys == ["0", "1"]
    with torch.no_grad():
        out = runner.model(expected["inputs"].float() / 255.0)
    assert torch.equal(out.pred_score, expected["continual_routed_pred_score"])
