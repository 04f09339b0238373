"""``scoring.image_score``: the default top-k mean, the largest patch and the 99th percentile, in the
eager model, the stacked (routed) experts and the exported ONNX graph alike."""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config

from anomalib_moleflow import MoLEFlow
from anomalib_moleflow.models.moleflow.anomaly_map import (
    AnomalyMapGenerator,
    image_scores,
    percentile,
)
from anomalib_moleflow.models.moleflow.loss import top_k_mean

NEEDS_ONNX = pytest.mark.skipif(
    find_spec("onnx") is None or find_spec("onnxscript") is None or find_spec("onnxruntime") is None,
    reason="needs onnx, onnxscript and onnxruntime",
)
#: Flow-only scoring, so the image score is the flow's image score itself.
FLOW_ONLY = {
    "scoring.global_score_weight": 0.0,
    "scoring.position_gaussian_weight": 0.0,
    "scoring.patch_memory_size": 0,
    "routing.router": "prototype",
}
STYLES = ("red_stripes", "blue_checker")


@pytest.mark.parametrize("n", [1, 2, 3, 64, 100, 1024])
def test_percentile_is_torch_quantile(n: int) -> None:
    values = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    for q in (0.0, 0.5, 0.99, 1.0):
        assert torch.allclose(percentile(values, q), torch.quantile(values, q, dim=1), atol=1e-6), q


def test_the_three_image_scores() -> None:
    scores = torch.arange(100, dtype=torch.float32).flip(0).view(1, 10, 10)  # 0 .. 99
    gen = AnomalyMapGenerator((16, 16), sigma=0.0, top_k=3)
    assert gen.image_score(scores).item() == pytest.approx(98.0)  # mean of 99, 98, 97: the default
    assert AnomalyMapGenerator((16, 16), top_k=3, image_score="max").image_score(scores).item() == 99.0
    assert AnomalyMapGenerator((16, 16), top_k=3, image_score="p99").image_score(scores).item() == pytest.approx(98.01)
    flat = torch.randn(4, 64)
    assert torch.equal(image_scores(flat, "top_k_mean", 3), top_k_mean(flat, 3))  # the default, bit for bit
    with pytest.raises(ValueError, match="image_score must be one of 'top_k_mean', 'max', 'p99', got 'median'"):
        image_scores(flat, "median", 3)
    with pytest.raises(ValueError, match="image_score must be one of"):
        AnomalyMapGenerator((16, 16), image_score="mean")


def test_config_names_a_bad_image_score() -> None:
    assert tiny_config().scoring.image_score == "top_k_mean"
    with pytest.raises(ValueError, match="scoring.image_score must be one of 'top_k_mean', 'max', 'p99', got 'p95'"):
        tiny_config(**{"scoring.image_score": "p95"})


@pytest.fixture(scope="module", params=["p99", "max"])
def routed(request: pytest.FixtureRequest, product_images: Callable[..., Any]) -> tuple[MoLEFlow, torch.Tensor, str]:
    """A routed two-product module with raw scores and the given image score, and 8 raw test images."""
    mode = request.param
    torch.manual_seed(0)
    config = tiny_config(**FLOW_ONLY, **{"scoring.image_score": mode})
    module = MoLEFlow(config=config, post_processor=False, evaluator=False, visualizer=False)
    model = module.model
    tests = []
    for index, style in enumerate(STYLES):
        key = model.add_task(style)
        for param in model.expert_parameters(key):
            param.data.add_(0.05 * torch.randn_like(param))
        train, _ = product_images(style, 6, seed=20 + index)
        with torch.no_grad():
            model.fit_task_statistics(key, [model.extract_features(module.prepare_images(train))])
        good, _ = product_images(style, 2, seed=50 + index)
        bad, _ = product_images(style, 2, seed=60 + index, defect=True)
        tests += [good, bad]
    module.eval()
    return module, torch.cat(tests), mode


def test_routed_scores_follow_the_image_score(routed: tuple[MoLEFlow, torch.Tensor, str]) -> None:
    module, images, mode = routed
    model = module.model
    with torch.no_grad():
        expected = module(images)
        assert model.routing_active and set(expected.pred_task.tolist()) == {0, 1}
        features = model.extract_features(module.prepare_images(images))
        for row, task in enumerate(expected.pred_task.tolist()):
            nll = model.patch_scores(features[row : row + 1], model.task_keys[task]).flatten(1)
            direct = nll.amax(dim=1) if mode == "max" else torch.quantile(nll, 0.99, dim=1)
            assert torch.allclose(expected.pred_score[row : row + 1], direct, rtol=1e-5), row
        model.stacked_routing = True
        try:
            stacked = module(images)
        finally:
            model.stacked_routing = False
    assert torch.equal(stacked.pred_task, expected.pred_task)
    assert torch.allclose(stacked.pred_score, expected.pred_score, rtol=1e-5)


@NEEDS_ONNX
def test_onnx_runtime_gives_the_eager_image_score(routed: tuple[MoLEFlow, torch.Tensor, str], tmp_path: Path) -> None:
    import onnxruntime as ort

    module, images, _ = routed
    with torch.no_grad():
        expected = module(images)
    path = module.to_onnx(tmp_path, input_size=tuple(images.shape[-2:]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names == ["pred_score", "anomaly_map", "pred_task"]
    for rows in (slice(0, 1), slice(0, 8)):  # dynamic batch
        outputs = dict(zip(names, session.run(None, {"input": images[rows].numpy()}), strict=True))
        assert outputs["pred_task"].tolist() == expected.pred_task[rows].tolist()
        score = torch.from_numpy(np.asarray(outputs["pred_score"]))
        assert torch.allclose(score, expected.pred_score[rows], rtol=1e-4, atol=1e-4)
