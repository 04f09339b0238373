"""End-to-end acceptance tests: anomalib's Engine, export, inferencer and command line.

(a) a tiny generated MVTec-layout category ``widget``: train (fit + test), predict, export to
    torch (loaded back with anomalib's ``TorchInferencer``), ONNX and OpenVINO;
(b) a few real MVTec AD ``bottle`` images copied into ``tmp_path``;
(c) ``anomalib train`` as a subprocess, with command-line arguments and with
    the shipped ``moleflow`` config.

Everything uses the tiny model configuration (64 px), so the whole file runs in about a
minute on two CPU cores. Accuracy is not asserted (two epochs on a dozen images), only that
every metric and output exists, has the right shape, and is finite.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.deploy import TorchInferencer
from anomalib.engine import Engine
from helpers import REPO, TINY_CONFIG, differing_keys, printed_metric, quiet_engine, run_anomalib_cli

from anomalib_moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.configs_catalog import resolve_config
from anomalib_moleflow.data import MVTecADLocal

REPO_ROOT = REPO
BOTTLE = Path(os.environ.get("MOLEFLOW_BOTTLE_DIR", REPO_ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"))
METRICS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score")
N_TEST = 8  # 4 good + 4 defect widget test images
SIZE = 64




def _assert_finite_metrics(metrics: Mapping[str, float]) -> None:
    for name in METRICS:
        assert name in metrics, f"{name} missing from {sorted(metrics)}"
        value = float(metrics[name])
        assert math.isfinite(value), f"{name} = {value}"
        assert -1e-6 <= value <= 1 + 1e-6, f"{name} = {value}"


def _assert_post_processor_fitted(model: MoLEFlow) -> None:
    """Validation ran: the normalisation statistics and thresholds are real numbers."""
    state = model.post_processor.state_dict()
    for name in ("image_min", "image_max", "_image_threshold", "pixel_min", "pixel_max", "_pixel_threshold"):
        assert torch.isfinite(state[name]).all(), f"post_processor.{name} = {state[name]} (no validation epoch ran?)"


@dataclass
class TrainedRun:
    engine: Engine
    model: MoLEFlow
    datamodule: MVTecADLocal
    metrics: dict[str, float]
    root: Path


@pytest.fixture(scope="module")
def widget_run(tiny_config: MoLEFlowConfig, widget_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """Tiny MoLE-Flow trained for two epochs on the widget category, then tested."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("widget_run")
    model = MoLEFlow(config=tiny_config)
    datamodule = MVTecADLocal(
        root=widget_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0,
    )
    engine = quiet_engine(root, max_epochs=2)
    results = engine.train(model, datamodule=datamodule)
    assert results is not None and len(results) == 1
    return TrainedRun(engine, model, datamodule, dict(results[0]), root)


# ----------------------------------------------------------------------------- (a) widget
def test_train_reports_finite_image_and_pixel_metrics(widget_run: TrainedRun) -> None:
    _assert_finite_metrics(widget_run.metrics)
    _assert_post_processor_fitted(widget_run.model)
    assert widget_run.model.model.task_keys == ["0"]
    checkpoints = list(widget_run.root.rglob("*.ckpt"))
    assert checkpoints, "the Engine saved no checkpoint"
    # the model fitted its expert's per-task statistics itself at the end of training
    torch_model = widget_run.model.model
    assert all(statistics.fitted("0") for statistics in torch_model.task_statistics)


def test_engine_checkpoint_loads_with_the_one_loader(widget_run: TrainedRun) -> None:
    """``MoLEFlow.from_checkpoint`` reads the Engine's checkpoint: same weights, same settings, and
    the same (post-processed) predictions as the trained model in memory."""
    path = sorted(widget_run.root.rglob("*.ckpt"))[-1]
    loaded = MoLEFlow.from_checkpoint(path)
    assert not loaded.training and loaded.config == widget_run.model.config and not loaded.normalize_scores
    # Every weight and statistic is the trained model's; only the score thresholds may differ: the
    # Engine writes its checkpoint after the last validation, before the model fits them at the end
    # of training (a single-product model does not use them: anomalib's post-processor normalises).
    differing = differing_keys(loaded.state_dict(), widget_run.model.state_dict())
    assert all(k.startswith("model.thresholds.") for k in differing), differing
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model = widget_run.model.eval()
    with torch.no_grad():
        got, want = loaded(images), model(images)
    assert torch.equal(got.pred_score, want.pred_score) and torch.equal(got.anomaly_map, want.anomaly_map)
    assert torch.equal(got.pred_task, torch.zeros(2, dtype=torch.long))  # the one expert
    assert torch.equal(got.pred_label, want.pred_label)


def test_predict_on_the_datamodule(widget_run: TrainedRun) -> None:
    predictions = widget_run.engine.predict(widget_run.model, datamodule=widget_run.datamodule)
    assert predictions is not None
    assert sum(len(batch.pred_score) for batch in predictions) == N_TEST
    for batch in predictions:
        assert isinstance(batch, ImageBatch)
        n = len(batch.pred_score)
        assert batch.pred_score.shape == (n,)
        assert batch.pred_label.shape == (n,)
        assert batch.anomaly_map.shape[0] == n
        assert batch.anomaly_map.shape[-2:] == (SIZE, SIZE)
        assert batch.anomaly_map.numel() == n * SIZE * SIZE
        assert batch.pred_mask.shape == batch.anomaly_map.shape
        assert torch.isfinite(batch.pred_score).all()
        assert torch.isfinite(batch.anomaly_map).all()
        # normalised by the post-processor (thresholds from the validation pass)
        assert batch.pred_score.min() >= 0 and batch.pred_score.max() <= 1


def test_predict_on_an_image_folder(widget_run: TrainedRun, widget_root: Path) -> None:
    folder = widget_root / "widget" / "test" / "defect"
    predictions = widget_run.engine.predict(widget_run.model, data_path=folder)
    assert predictions is not None
    assert sum(len(batch.pred_score) for batch in predictions) == len(list(folder.glob("*.png")))
    assert all(torch.isfinite(batch.pred_score).all() for batch in predictions)


def test_export_torch_and_torch_inferencer(
    widget_run: TrainedRun, widget_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = widget_run.engine.export(widget_run.model, export_type="torch", export_root=tmp_path)
    assert path is not None and Path(path).is_file() and Path(path).suffix == ".pt"

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib refuses to unpickle a model otherwise
    inferencer = TorchInferencer(path=path, device="cpu")
    image_path = sorted((widget_root / "widget" / "test" / "defect").glob("*.png"))[0]
    prediction = inferencer.predict(image_path)
    assert isinstance(prediction, ImageBatch)
    assert prediction.pred_score.shape == (1,)
    assert prediction.anomaly_map.shape[-2:] == (SIZE, SIZE)
    assert prediction.anomaly_map.numel() == SIZE * SIZE
    assert torch.isfinite(prediction.pred_score).all()
    assert torch.isfinite(prediction.anomaly_map).all()

    # the exported model scores like the trained one in memory
    model = widget_run.model.eval()
    with torch.no_grad():
        expected = model(inferencer.pre_process(torch.as_tensor(prediction.image)))
    assert torch.allclose(prediction.pred_score, expected.pred_score, atol=1e-5)
    assert torch.allclose(prediction.anomaly_map.reshape(-1), expected.anomaly_map.reshape(-1), atol=1e-5)


@pytest.mark.skipif(
    find_spec("onnx") is None or find_spec("onnxscript") is None,
    reason="ONNX export needs the onnx and onnxscript packages (pip install anomalib-moleflow[export])",
)
def test_export_onnx(widget_run: TrainedRun, tmp_path: Path) -> None:
    model = widget_run.model.eval()
    path = widget_run.engine.export(model, export_type="onnx", export_root=tmp_path)
    assert path is not None and Path(path).is_file() and Path(path).suffix == ".onnx"
    if find_spec("onnxruntime") is None:
        return
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert {"pred_score", "anomaly_map"} <= set(names)
    for batch_size in (1, 3):  # dynamic batch axis
        images = torch.rand(batch_size, 3, SIZE, SIZE)
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
        with torch.no_grad():
            expected = model(images)
        assert outputs["pred_score"].shape == (batch_size,)
        assert torch.allclose(torch.from_numpy(outputs["pred_score"]), expected.pred_score, atol=1e-4)
        assert torch.allclose(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, atol=1e-4)


@pytest.mark.skipif(
    find_spec("onnx") is None or find_spec("onnxscript") is None or find_spec("onnxruntime") is None,
    reason="needs onnx, onnxscript and onnxruntime",
)
def test_export_onnx_of_the_flow_without_router(tiny_config: MoLEFlowConfig, tmp_path: Path) -> None:
    """The scoring graph itself (backbone, adapters, flow with its Python-side grid size,
    FrEIA-style in-place ``a *= 0.1``, DIA, anomaly map) exports and matches PyTorch; kept apart
    from :func:`test_export_onnx` so a failure there can be told apart from one in the router."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = MoLEFlow(config=tiny_config.updated({"routing.router": "none"}), post_processor=False)
    model.add_task()
    for param in model.model.expert_parameters("0"):  # a non-identity expert
        torch.nn.init.normal_(param, std=0.05)
    model.eval()
    path = model.to_onnx(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    for batch_size in (1, 2):
        images = torch.rand(batch_size, 3, SIZE, SIZE)
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
        with torch.no_grad():
            expected = model(images)
        assert torch.allclose(torch.from_numpy(outputs["pred_score"]), expected.pred_score, rtol=1e-4, atol=1e-3)
        assert torch.allclose(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(find_spec("openvino") is None, reason="OpenVINO export needs the openvino package")
def test_export_openvino(widget_run: TrainedRun, tmp_path: Path) -> None:
    import openvino as ov

    model = widget_run.model.eval()
    path = widget_run.engine.export(model, export_type="openvino", export_root=tmp_path)
    assert path is not None and Path(path).is_file() and Path(path).suffix == ".xml"
    assert Path(path).with_suffix(".bin").is_file()
    # f32: OpenVINO's CPU plugin may default to bf16 inference, which moves scores by ~1e-3
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(2, 3, SIZE, SIZE)
    result = compiled(images.numpy())
    outputs = {output.get_any_name(): result[output] for output in compiled.outputs}
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(torch.from_numpy(outputs["pred_score"]), expected.pred_score, atol=1e-4)
    assert torch.allclose(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, atol=1e-4)


# ----------------------------------------------------------------------------- (b) real data
def _copy_bottle_subset(dest: Path, n_train: int = 16, n_good: int = 4, n_defect: int = 4) -> Path:
    """Copy a few bottle images (and the masks of the defective ones) into MVTec layout."""
    category = dest / "bottle"
    plan = (("train/good", n_train), ("test/good", n_good), ("test/broken_large", n_defect))
    for sub, count in plan:
        target = category / sub
        target.mkdir(parents=True)
        for image in sorted((BOTTLE / sub).glob("*.png"))[:count]:
            shutil.copyfile(image, target / image.name)  # a copy: the shared data stays read-only
            if sub.startswith("test/") and not sub.endswith("good"):
                mask_dir = category / "ground_truth" / sub.split("/")[1]
                mask_dir.mkdir(parents=True, exist_ok=True)
                mask = BOTTLE / "ground_truth" / sub.split("/")[1] / f"{image.stem}_mask.png"
                shutil.copyfile(mask, mask_dir / mask.name)
    return dest


@pytest.mark.skipif(not (BOTTLE / "train" / "good").is_dir(), reason=f"MVTec AD bottle not found at {BOTTLE}")
def test_real_bottle_images(tiny_config: MoLEFlowConfig, tmp_path: Path) -> None:
    root = _copy_bottle_subset(tmp_path / "mvtec_ad")
    torch.manual_seed(0)
    model = MoLEFlow(config=tiny_config)
    datamodule = MVTecADLocal(root=root, category="bottle", train_batch_size=8, eval_batch_size=8, num_workers=0)
    results = quiet_engine(tmp_path / "results", max_epochs=2).train(model, datamodule=datamodule)
    assert results is not None
    _assert_finite_metrics(results[0])
    _assert_post_processor_fitted(model)


# ----------------------------------------------------------------------------- (c) command line
#: :data:`helpers.TINY_CONFIG` as ``--model.config.<group>.<field> VALUE`` arguments.
_TINY_MODEL_ARGS = tuple(
    arg
    for group, values in TINY_CONFIG.items()
    for name, value in values.items()
    for arg in (f"--model.config.{group}.{name}", str(value))
)


def _saved_model(results_root: Path) -> MoLEFlow:
    checkpoints = sorted(results_root.rglob("*.ckpt"))
    assert checkpoints, (
        f"no checkpoint under {results_root}: anomalib saves it after a validation pass, "
        "so probably no validation epoch ran (trainer.check_val_every_n_epoch > max_epochs?)"
    )
    return MoLEFlow.load_from_checkpoint(checkpoints[-1])


def test_cli_train_with_arguments(widget_root: Path, tmp_path: Path) -> None:
    output = run_anomalib_cli(
        [
            "train",
            "--model", "anomalib_moleflow.MoLEFlow",
            *_TINY_MODEL_ARGS,
            "--data", "anomalib_moleflow.data.MVTecADLocal",
            "--data.root", str(widget_root),
            "--data.category", "widget",
            "--data.train_batch_size", "4",
            "--data.eval_batch_size", "4",
            "--data.num_workers", "0",
            "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu",
            "--default_root_dir", str(tmp_path / "results"),
        ],  # fmt: skip
        cwd=tmp_path,
    )
    for name in ("image_AUROC", "pixel_AUROC"):
        assert math.isfinite(printed_metric(output, name)), name
    model = _saved_model(tmp_path / "results")
    assert model.config.features.image_size == 64
    assert model.config.flow.n_coupling_blocks == 2
    assert model.config == MoLEFlowConfig.from_dict(TINY_CONFIG)
    _assert_post_processor_fitted(model)


def test_cli_train_with_the_shipped_config(widget_root: Path, tmp_path: Path) -> None:
    """The shipped ``moleflow`` config with root, category and epochs overridden (and a tiny model)."""
    config = resolve_config("moleflow")
    assert config.is_file()
    output = run_anomalib_cli(
        [
            "train",
            "--config", str(config),
            *_TINY_MODEL_ARGS,
            "--data.root", str(widget_root),
            "--data.category", "widget",
            "--data.num_workers", "0",
            "--trainer.max_epochs", "1",
            "--default_root_dir", str(tmp_path / "results"),
        ],  # fmt: skip
        cwd=tmp_path,
    )
    for name in ("image_AUROC", "pixel_AUROC"):
        assert math.isfinite(printed_metric(output, name)), name
    # the metrics must come from normalised scores: a validation pass has to run even when
    # --trainer.max_epochs is lowered below the config's check_val_every_n_epoch
    _assert_post_processor_fitted(_saved_model(tmp_path / "results"))
