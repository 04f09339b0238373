"""One exported graph for a two-product model: PyTorch's routed forward, the graph in PyTorch,
ONNX Runtime and OpenVINO pick the same product per image and give the same scores and labels;
the resize in the graph is training's antialiased one; product names travel in the metadata."""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch.nn import functional as F

from anomalib_moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.export import (
    OUTPUT_NAMES,
    ExportGraph,
    ExportPreProcessor,
    MoLEFlowOpenVINOInferencer,
    product_names,
    resize_matrix,
)
from anomalib_moleflow.models.moleflow.pre_processing import AntialiasedPreProcessor

STYLES = ("red_stripes", "blue_checker")
NEEDS_ONNX = pytest.mark.skipif(
    find_spec("onnx") is None or find_spec("onnxscript") is None or find_spec("onnxruntime") is None,
    reason="needs onnx, onnxscript and onnxruntime",
)


@pytest.fixture(scope="module")
def two_products(product_images: Callable[..., Any]) -> tuple[MoLEFlow, torch.Tensor]:
    """A routed two-product module (scores normalised per product, experts perturbed, statistics and
    thresholds fitted on other images) and 8 raw test images of 80 x 72 px, products interleaved."""
    torch.manual_seed(0)
    module = MoLEFlow(config=tiny_config(), normalize_scores=True, evaluator=False, visualizer=False)
    model = module.model
    for style in STYLES:
        key = model.add_task(style)
        for param in model.expert_parameters(key):
            param.data.add_(0.05 * torch.randn_like(param))
    module.eval()
    tests = []
    with torch.no_grad():
        for index, (key, style) in enumerate(zip(model.task_keys, STYLES, strict=True)):
            train, _ = product_images(style, 6, seed=20 + index, size=80)
            good, _ = product_images(style, 2, seed=30 + index, size=80)
            defective, _ = product_images(style, 2, seed=40 + index, defect=True, size=80)
            model.fit_task_statistics(key, [model.extract_features(module.prepare_images(train))])
            calibration = torch.cat([good, defective])
            with model.oracle(key), model.raw_scores():
                raw = model.predict_features(model.extract_features(module.prepare_images(calibration)))
            model.fit_task_thresholds(key, raw.pred_score, raw.anomaly_map[:, 0], torch.tensor([0, 0, 1, 1]), None)
            good, _ = product_images(style, 2, seed=50 + index, size=80)
            defective, _ = product_images(style, 2, seed=60 + index, defect=True, size=80)
            tests.append(torch.cat([good, defective]))
    images = torch.stack([t[i] for i in range(4) for t in tests])[..., :72]  # not square: rows and columns differ
    return module, images


def _reference(module: MoLEFlow, images: torch.Tensor) -> Any:
    with torch.no_grad():
        return module(images)


def _assert_same(outputs: dict[str, np.ndarray], expected: Any, rtol: float) -> None:
    assert outputs["pred_task"].tolist() == expected.pred_task.tolist()
    score = torch.from_numpy(np.asarray(outputs["pred_score"]))
    assert torch.allclose(score, expected.pred_score, rtol=rtol, atol=rtol * 1e-2)
    amap = torch.from_numpy(np.asarray(outputs["anomaly_map"]))
    assert torch.allclose(amap, expected.anomaly_map, rtol=rtol, atol=rtol * 1e-2)
    # labels agree wherever the score is not within rounding of the threshold
    clear = (expected.pred_score - 0.5).abs() > 1e-4
    assert torch.equal(torch.from_numpy(np.asarray(outputs["pred_label"]))[clear], expected.pred_label[clear])


def test_resize_matrices_are_pytorchs_antialiased_resize() -> None:
    images = torch.rand(2, 3, 100, 130)
    pre = ExportPreProcessor((100, 130), (64, 64), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = (F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True) - mean) / std
    assert torch.allclose(pre(images), expected, atol=1e-5)
    plain = (F.interpolate(images, size=(64, 64), mode="bilinear", antialias=False) - mean) / std
    assert not torch.allclose(pre(images), plain, atol=1e-2)  # what anomalib's export transform computed
    assert torch.allclose(resize_matrix(5, 5), torch.eye(5))


def test_the_modules_inference_transform_keeps_the_antialiasing() -> None:
    module = MoLEFlow(config=tiny_config(), evaluator=False, visualizer=False)
    assert isinstance(module.pre_processor, AntialiasedPreProcessor)
    images = torch.rand(2, 3, 100, 90)
    assert torch.allclose(module.pre_processor(images), module.pre_processor.transform(images))
    module.pre_processor.load_checkpoint_config(module.pre_processor.checkpoint_config())
    assert torch.allclose(module.pre_processor(images), module.pre_processor.transform(images))


def test_the_graph_in_pytorch_is_the_routed_forward(two_products: tuple[MoLEFlow, torch.Tensor]) -> None:
    module, images = two_products
    expected = _reference(module, images)
    assert set(expected.pred_task.tolist()) == {0, 1}  # both products are routed to
    graph = ExportGraph(module, input_size=images.shape[-2:]).eval()
    with torch.no_grad():
        outputs = dict(zip(OUTPUT_NAMES, graph(images), strict=True))
    _assert_same({k: v.numpy() for k, v in outputs.items()}, expected, rtol=1e-5)
    assert graph.product_names == list(STYLES)


@NEEDS_ONNX
def test_onnx_runtime_and_openvino_match_pytorch(
    two_products: tuple[MoLEFlow, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)  # anomalib's OpenVINO inferencer writes its cache into the working folder

    module, images = two_products
    expected = _reference(module, images)
    path = module.to_onnx(tmp_path, input_size=images.shape[-2:])
    assert path.suffix == ".onnx" and product_names(path) == list(STYLES)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names == list(OUTPUT_NAMES)
    for rows in (slice(0, 1), slice(0, 3), slice(0, 8)):  # dynamic batch
        outputs = dict(zip(names, session.run(None, {"input": images[rows].numpy()}), strict=True))
        _assert_same(outputs, expected_rows(expected, rows), rtol=1e-4)
    if find_spec("openvino") is None:
        return
    import openvino as ov

    xml = tmp_path / "openvino" / "model.xml"
    ov.save_model(ov.convert_model(path), xml, compress_to_fp16=False)  # what anomalib's to_openvino does
    assert product_names(xml) == list(STYLES)
    inferencer = MoLEFlowOpenVINOInferencer(xml, device="CPU")  # f32 by default, not the CPU's bf16
    assert inferencer.config == {"INFERENCE_PRECISION_HINT": "f32"}
    assert MoLEFlowOpenVINOInferencer(xml, device="CPU", config={"PERFORMANCE_HINT": "LATENCY"}).config == {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    batch = inferencer.predict(images.numpy())
    outputs = {"pred_score": batch.pred_score, "pred_label": batch.pred_label, "anomaly_map": batch.anomaly_map,
               "pred_task": batch.pred_task}  # fmt: skip
    _assert_same(outputs, expected, rtol=1e-3)
    assert batch.pred_product == [STYLES[i] for i in expected.pred_task.tolist()]


def expected_rows(expected: Any, rows: slice) -> Any:
    """The first rows of a routed batch (its fields and ``pred_task``)."""
    return type(expected)(*(None if v is None else v[rows] for v in expected), pred_task=expected.pred_task[rows])


@NEEDS_ONNX
def test_onnx_runtime_gives_pytorchs_raw_scores_on_the_training_images(
    two_products: tuple[MoLEFlow, torch.Tensor], product_images: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw scores (not normalised, so not clamped to [0, 1]) of the graph match PyTorch's on the
    products' own training images: their patch scores are the patch memory's reference values and
    their patches are in the memory, so the surprisal and the memory distance there have to move
    no more than their inputs do when another runtime rounds differently."""
    import onnxruntime as ort

    module, _ = two_products
    model = module.model
    monkeypatch.setattr(module, "post_processor", None)  # the graph outputs the raw scores
    train = [product_images(style, 6, seed=20 + index, size=80)[0] for index, style in enumerate(STYLES)]  # the fixture's
    images = torch.stack([t[i] for i in range(6) for t in train])
    with torch.no_grad(), model.raw_scores():
        expected = model.predict_features(model.extract_features(module.prepare_images(images)))
        path = module.to_onnx(tmp_path, input_size=images.shape[-2:])
    assert set(expected.pred_task.tolist()) == {0, 1}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True))
    assert outputs["pred_task"].tolist() == expected.pred_task.tolist()
    amap = torch.from_numpy(outputs["anomaly_map"])
    spread = (expected.anomaly_map.max() - expected.anomaly_map.min()).item()
    assert spread > 1.0 and expected.anomaly_map.max() > 1.0  # raw: beyond the normalised range
    assert (amap - expected.anomaly_map).abs().max().item() <= 2e-3 * spread
    # the image score sums z-scores against six training images, whose small spread magnifies the
    # backbone's rounding (about 1e-6 between the runtimes) some hundred times
    score = torch.from_numpy(outputs["pred_score"])
    assert torch.allclose(score, expected.pred_score, rtol=1e-3, atol=1e-3)


def test_the_graph_needs_an_expert_and_labels_need_a_post_processor(tmp_path: Path) -> None:
    module = MoLEFlow(config=tiny_config(), evaluator=False, visualizer=False)
    with pytest.raises(ValueError, match="no task expert"):
        ExportGraph(module)
    module.add_task()
    assert ExportGraph(module).output_names == OUTPUT_NAMES
    module.post_processor = None  # raw scores, nothing to label them with
    graph = ExportGraph(module).eval()
    assert graph.output_names == ("pred_score", "anomaly_map", "pred_task")
    with torch.no_grad():
        assert len(graph(torch.rand(1, 3, 64, 64))) == 3
    with pytest.raises(ValueError, match="holds no MoLE-Flow product names"):
        product_names(tmp_path / "model.txt")


def _two_perturbed_experts(config: MoLEFlowConfig) -> MoLEFlow:
    """A module with one expert per style, its expert parameters moved off their identity start."""
    module = MoLEFlow(config=config, evaluator=False, visualizer=False)
    for style in STYLES:
        key = module.model.add_task(style)
        for param in module.model.expert_parameters(key):
            param.data.add_(0.05 * torch.randn_like(param))
    return module


def _onnx_runtime_outputs(module: MoLEFlow, images: torch.Tensor, folder: Path) -> dict[str, np.ndarray]:
    """The exported graph's outputs by name, from ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(module.to_onnx(folder)), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True))


@NEEDS_ONNX
def test_the_version_modules_export_to_onnx(tmp_path: Path) -> None:
    """v1/v2 adapter, task-conditioned multi-scale context, v6 patch attention and v4.1's fixed
    context go through the exported graph: ONNX Runtime gives PyTorch's scores."""
    torch.manual_seed(0)
    config = tiny_config(**{
        "experts.input_adapter": "instance_norm_mlp", "flow.use_ms_context": True, "flow.ms_context_kind": "task_conditioned",
        "flow.use_patch_attention": True, "flow.patch_attention_hidden": 16, "flow.use_neighborhood_context": True,
    })  # fmt: skip
    module = _two_perturbed_experts(config)
    module.eval()
    images = torch.rand(3, 3, 64, 64)
    graph = ExportGraph(module).eval()
    with torch.no_grad():
        expected = dict(zip(graph.output_names, graph(images), strict=True))
    outputs = _onnx_runtime_outputs(module, images, tmp_path)
    assert outputs["pred_task"].tolist() == [1, 1, 1]  # the active expert, the one with an adapter
    for name in ("pred_score", "anomaly_map"):
        assert torch.allclose(torch.from_numpy(outputs[name]), expected[name], rtol=1e-4, atol=1e-4), name


@NEEDS_ONNX
def test_sc_lora_and_cpcf_attention_export_to_onnx(tmp_path: Path) -> None:
    """v4's SC-LoRA grids and CPCF's neighbourhood attention go through the exported graph: ONNX
    Runtime routes and scores as PyTorch does."""
    torch.manual_seed(0)
    config = tiny_config(**{
        "experts.lora_kind": "spatial_contextual", "experts.sc_lora_grid_size": 3, "flow.use_cpcf": True,
        "flow.cpcf_use_attention": True, "flow.context_kernel": 3,
    })  # fmt: skip
    module = _two_perturbed_experts(config)
    for subnet in module.model.flow.subnets():
        torch.nn.init.normal_(subnet.context_conv.query.weight, std=0.3)  # attention away from the plain mean
    module.eval()
    images = torch.rand(3, 3, 64, 64)
    graph = ExportGraph(module).eval()
    assert graph.stacked.spatial_flow_layers  # the SC-LoRA grids are stacked for the graph
    with torch.no_grad():
        expected = dict(zip(graph.output_names, graph(images), strict=True))
        module.model.set_task("0")
        other = ExportGraph(module).eval()(images)[0]
        module.model.set_task("1")
    assert not torch.allclose(other, expected["pred_score"])  # the two experts score differently
    outputs = _onnx_runtime_outputs(module, images, tmp_path)
    assert outputs["pred_task"].tolist() == [1, 1, 1]
    for name in ("pred_score", "anomaly_map"):
        assert torch.allclose(torch.from_numpy(outputs[name]), expected[name], rtol=1e-4, atol=1e-4), name
