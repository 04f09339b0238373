"""A continual run's task checkpoint through anomalib's own entry points: ``anomalib test`` and
``anomalib export`` (torch and OpenVINO) with ``--ckpt_path`` (the module is built from the command line, with the
default configuration, before the checkpoint loads), and ``Engine.predict(..., ckpt_path=...)``.

The run is tiny (two synthetic products, one epoch each, 64 px); loaded from the second task's
checkpoint, the model routes between both experts and scores each product on its own scale.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from anomalib.deploy import TorchInferencer
from helpers import (
    printed_metric,
    run_anomalib_cli,
    REPO,
    quiet_engine,
    read_image,
    task_test_images,
    tiny_config,
)

from anomalib_moleflow import MoLEFlow
from anomalib_moleflow.continual import (
    ContinualRunner,
    RunOptions,
    TaskStream,
    TrainerOptions,
)
from anomalib_moleflow.data import MVTecADLocal
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.io import safe_torch_load
from anomalib_moleflow.models.moleflow.checkpoint_format import saved_settings
from anomalib_moleflow.models.moleflow.export import (
    MoLEFlowOpenVINOInferencer,
    MoLEFlowTorchInferencer,
    product_names,
)

TASKS = ["red_stripes", "blue_checker"]


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stream(tmp_path_factory.mktemp("stream"), TASKS, n_train=8, n_good=2, n_defect=2)


@pytest.fixture(scope="module")
def checkpoint(stream_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``task_01_blue_checker.ckpt`` of a finished two-product run."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    stream = TaskStream(TASKS, root=str(stream_root), train_batch_size=4, eval_batch_size=4, num_workers=0)
    ContinualRunner(tiny_config(), stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(out))).run()
    path = out / "checkpoints" / "task_01_blue_checker.ckpt"
    assert path.is_file()
    return path


def _datamodule(root: Path, category: str) -> MVTecADLocal:
    return MVTecADLocal(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)


def test_anomalib_test_reports_the_routed_models_metrics(checkpoint: Path, stream_root: Path, tmp_path: Path) -> None:
    """``anomalib test --model MoLEFlow --ckpt_path`` on the first product's data (so the router has
    to pick the first expert out of two) prints the metrics the loaded model gets in-process."""
    output = run_anomalib_cli(
        [
            "test", "--model", "MoLEFlow",
            "--data", "anomalib_moleflow.data.MVTecADLocal", "--data.root", str(stream_root),
            "--data.category", TASKS[0], "--data.num_workers", "0", "--data.eval_batch_size", "4",
            "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path / "results"),
            "--ckpt_path", str(checkpoint),
        ],  # fmt: skip
        cwd=tmp_path,
    )
    loaded = MoLEFlow.from_checkpoint(checkpoint)
    assert loaded.model.routing_active and loaded.model.task_names == TASKS
    expected = quiet_engine(tmp_path / "in_process", 1).test(loaded, datamodule=_datamodule(stream_root, TASKS[0]), verbose=False)
    for name in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
        assert printed_metric(output, name) == pytest.approx(expected[0][name], abs=1e-6), name


def test_engine_predict_with_ckpt_path_routes_among_every_expert(checkpoint: Path, stream_root: Path, tmp_path: Path) -> None:
    """A module built with the default configuration takes the checkpoint's settings, experts and
    pre-processing: its predictions equal those of ``MoLEFlow.from_checkpoint``."""
    module = MoLEFlow()  # as `anomalib predict --model MoLEFlow` builds it: 256 px, another backbone
    reference = MoLEFlow.from_checkpoint(checkpoint)
    for task in TASKS:
        got = quiet_engine(tmp_path / task, 1).predict(module, datamodule=_datamodule(stream_root, task), ckpt_path=checkpoint)
        want = quiet_engine(tmp_path / task, 1).predict(reference, datamodule=_datamodule(stream_root, task))
        assert got is not None and want is not None and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.anomaly_map.shape[-2:] == (64, 64)
            assert torch.allclose(a.pred_score, b.pred_score, atol=1e-6)
            assert torch.allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
            assert torch.equal(a.pred_label, b.pred_label)
    assert module.config == reference.config and module.normalize_scores
    images = torch.stack([read_image(p) for task in TASKS for p in task_test_images(stream_root, task)])
    with torch.no_grad():
        routed = module.eval()(images).pred_task
    assert routed.unique().tolist() == [0, 1]  # both experts are used


def test_anomalib_export_torch_from_a_continual_checkpoint(
    checkpoint: Path, stream_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``anomalib export --export_type torch --ckpt_path``: anomalib's ``TorchInferencer`` scores an
    image of either product like the loaded model."""
    run_anomalib_cli(
        [
            "export", "--model", "MoLEFlow", "--export_type", "torch", "--ckpt_path", str(checkpoint),
            "--export_root", str(tmp_path / "export"), "--default_root_dir", str(tmp_path / "export"),
        ],  # fmt: skip
        cwd=tmp_path,
    )
    path = tmp_path / "export" / "weights" / "torch" / "model.pt"
    assert path.is_file()
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib refuses to unpickle a model otherwise
    inferencer, with_products = TorchInferencer(path=path, device="cpu"), MoLEFlowTorchInferencer(path=path, device="cpu")
    reference = MoLEFlow.from_checkpoint(checkpoint)
    for index, task in enumerate(TASKS):
        image = task_test_images(stream_root, task)[-1]
        prediction = inferencer.predict(image)
        with torch.no_grad():
            expected = reference(read_image(image)[None])
        assert torch.allclose(prediction.pred_score, expected.pred_score, atol=1e-5)
        assert torch.allclose(prediction.anomaly_map.reshape(-1), expected.anomaly_map.reshape(-1), atol=1e-5)
        routed = with_products.predict(image)
        assert torch.equal(routed.pred_score, prediction.pred_score)
        assert routed.pred_task.tolist() == [index] and routed.pred_product == [task]


@pytest.mark.skipif(
    find_spec("openvino") is None or find_spec("onnxscript") is None, reason="needs openvino and onnxscript"
)
def test_anomalib_export_openvino_from_a_continual_checkpoint(
    checkpoint: Path, stream_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``anomalib export --export_type openvino --ckpt_path``: one graph routing between both
    products, its product names in the file; OpenVINO agrees with PyTorch."""
    monkeypatch.chdir(tmp_path)  # anomalib's OpenVINO inferencer writes its cache into the working folder
    run_anomalib_cli(
        [
            "export", "--model", "MoLEFlow", "--export_type", "openvino", "--ckpt_path", str(checkpoint),
            "--export_root", str(tmp_path / "export"), "--default_root_dir", str(tmp_path / "export"),
        ],  # fmt: skip
        cwd=tmp_path,
    )
    path = tmp_path / "export" / "weights" / "openvino" / "model.xml"
    assert path.is_file() and product_names(path) == TASKS
    inferencer = MoLEFlowOpenVINOInferencer(path, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.stack([read_image(p) for task in TASKS for p in task_test_images(stream_root, task)])
    batch = inferencer.predict(images.numpy())
    with torch.no_grad():
        expected = MoLEFlow.from_checkpoint(checkpoint)(images)
    assert batch.pred_task.tolist() == expected.pred_task.tolist() and set(batch.pred_task.tolist()) == {0, 1}
    assert batch.pred_product == [TASKS[i] for i in expected.pred_task.tolist()]
    assert torch.allclose(torch.from_numpy(batch.pred_score), expected.pred_score, rtol=1e-3, atol=1e-5)
    # maps normalised to [0, 1]: OpenVINO's f32 kernels differ from PyTorch's by up to about 3e-5 there
    assert torch.allclose(torch.from_numpy(batch.anomaly_map), expected.anomaly_map, rtol=1e-3, atol=1e-4)


def _format_1_checkpoint(target: Path) -> Path:
    """The committed format-1 fixture (see ``tests/fixtures/legacy_v1``) with the packaged
    backbone weights put back, as ``target``."""
    checkpoint = safe_torch_load(REPO / "tests" / "fixtures" / "legacy_v1" / "continual_task_01.ckpt")
    assert "pytorch-lightning_version" not in checkpoint and "model_config" in checkpoint
    packaged = MoLEFlow(config=saved_settings(checkpoint).config).state_dict()
    backbone = {k: v for k, v in packaged.items() if k.startswith("model.feature_extractor.backbone.")}
    torch.save({**checkpoint, "state_dict": {**checkpoint["state_dict"], **backbone}}, target)
    return target


def test_a_format_1_checkpoint_loads_through_anomalibs_loaders(stream_root: Path, tmp_path: Path) -> None:
    """Written before the Lightning keys: ``Engine.predict(..., ckpt_path=...)`` (``anomalib
    predict``/``test``) and ``load_from_checkpoint`` (``anomalib export``) load it as
    ``MoLEFlow.from_checkpoint`` does."""
    path = _format_1_checkpoint(tmp_path / "task_01_blue_checker.ckpt")
    reference = MoLEFlow.from_checkpoint(path)
    datamodule = _datamodule(stream_root, TASKS[1])
    got = quiet_engine(tmp_path / "a", 1).predict(MoLEFlow(), datamodule=datamodule, ckpt_path=path)
    want = quiet_engine(tmp_path / "b", 1).predict(reference, datamodule=datamodule)
    assert got is not None and want is not None
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    loaded = MoLEFlow.load_from_checkpoint(path)
    assert loaded.model.task_names == reference.model.task_names and loaded.normalize_scores
    images = torch.stack([read_image(p) for p in task_test_images(stream_root, TASKS[1])])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images).pred_score, reference(images).pred_score)
