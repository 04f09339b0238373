"""Evaluation of one task of a continual model: routed (task id hidden) and oracle (task id given).

The model is tiny and untrained: its experts are identity-initialised, and each task's statistics
(router prototype, scoring statistics, thresholds) are fitted by hand from the task's images, which
is all that routing and scoring need. The two synthetic products differ in colour and texture, so
routing them is trivial.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import read_image, task_test_images

from anomalib_moleflow.continual.evaluation import (
    evaluate_task,
    loader_of_test_split,
    task_thresholds,
)
from anomalib_moleflow.continual.metrics import image_and_pixel_metrics, image_f1
from anomalib_moleflow.continual.runner import build_model
from anomalib_moleflow.data import MVTecADLocal
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.gaussian import pool_features

TASKS = ("red_stripes", "blue_checker")
METRICS = {"image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1"}


@dataclass
class TaskImages:
    images: torch.Tensor  # (N, 3, 64, 64) in [0, 1]
    labels: torch.Tensor  # (N,)
    masks: torch.Tensor  # (N, 64, 64) bool


def _test_images(root: Path, task: str) -> TaskImages:
    paths = task_test_images(root, task)
    masks = []
    for path in paths:
        if path.parent.name == "good":
            masks.append(torch.zeros(64, 64, dtype=torch.bool))
        else:
            mask = root / task / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            masks.append(read_image(mask)[0] > 0.5)
    labels = torch.tensor([int(p.parent.name != "good") for p in paths])
    return TaskImages(torch.stack([read_image(p) for p in paths]), labels, torch.stack(masks))


def _features(model: MoLEFlow, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.extract_features(model.pre_processor.transform(images))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stream(tmp_path_factory.mktemp("products"), TASKS, n_train=8, n_good=2, n_defect=2)


@pytest.fixture(scope="module")
def model(root: Path, tiny_config: MoLEFlowConfig) -> Iterator[MoLEFlow]:
    torch.manual_seed(0)
    model = build_model(tiny_config.updated({"routing.router": "prototype"})).eval()  # misrouting by swapped prototypes
    for name in TASKS:
        key = model.add_task(name)
        train = sorted((root / name / "train" / "good").glob("*.png"))
        model.model.fit_task_statistics(key, [_features(model, torch.stack([read_image(p) for p in train]))])
        test = _test_images(root, name)
        with torch.no_grad(), model.model.oracle(key), model.model.raw_scores():
            raw = model.model.predict_features(_features(model, test.images))
        model.model.fit_task_thresholds(key, raw.pred_score, raw.anomaly_map[:, 0], test.labels, test.masks)
    assert model.model.routing_active
    yield model


def _datamodule(root: Path, task: int) -> MVTecADLocal:
    return MVTecADLocal(root=root, category=TASKS[task], eval_batch_size=3, num_workers=0)


def _expected(model: MoLEFlow, root: Path, task: int, key: str | None = None) -> dict[str, float]:
    """Metrics of expert ``key`` (default: routed) on task ``task``'s test images, computed here."""
    test = _test_images(root, TASKS[task])
    features = _features(model, test.images)
    with torch.no_grad():
        if key is None:
            out = model.model.predict_features(features)
        else:
            with model.model.oracle(key):
                out = model.model.predict_features(features)
    metrics = image_and_pixel_metrics(out.pred_score, out.anomaly_map[:, 0], test.labels, test.masks)
    # normalised scores: anomalib's F1 of ``score > 0.5``. The thresholds here are fitted on these very
    # images, so one score sits on the threshold, where batch-size rounding decides its side: both kept.
    return metrics | {"image_F1": F1Either(image_f1(out.pred_score, test.labels, t) for t in (0.5 - 1e-5, 0.5 + 1e-5))}


#: The evaluation scores in loader batches (3 + 1 images), the expectation in one batch of 4: float
#: rounding differs between the two, and with it pixel AP by up to a few 1e-6.
METRIC_TOLERANCE = 1e-5


class F1Either:
    """An expected F1 equal to any of ``values`` (compared exactly inside ``pytest.approx`` dicts)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, values: Iterable[float | None]) -> None:
        self.values = list(values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and any(v is not None and abs(other - v) < 1e-6 for v in self.values)

    def __repr__(self) -> str:
        return f"one of {self.values}"


def test_loader_of_test_split_sets_up_the_datamodule(root: Path) -> None:
    batches = list(loader_of_test_split(_datamodule(root, 0)))
    assert sum(len(b.image) for b in batches) == 4 and [len(b.image) for b in batches] == [3, 1]


@pytest.mark.parametrize("task", [0, 1])
def test_routed_and_oracle_metrics(model: MoLEFlow, root: Path, task: int) -> None:
    out = evaluate_task(model, _datamodule(root, task), task)
    assert set(out) == {"routed", "oracle", "routing_accuracy", "n_images", "model_seconds"}
    assert out["n_images"] == 4 and out["model_seconds"] > 0
    assert out["routing_accuracy"] == 1.0  # separable products: every image reaches its own expert
    assert set(out["routed"]) == set(out["oracle"]) == METRICS
    expected = _expected(model, root, task, key=str(task))
    assert out["oracle"] == pytest.approx(expected, abs=METRIC_TOLERANCE)
    assert out["routed"] == pytest.approx(_expected(model, root, task), abs=METRIC_TOLERANCE)
    assert out["routed"] == out["oracle"]  # same expert, same normalised scores


def test_misrouted_images_are_scored_by_the_expert_they_reached(model: MoLEFlow, root: Path) -> None:
    """Swapped prototypes send every image to the other product's expert: routing accuracy 0, the
    routed metrics are that expert's, the oracle metrics stay the true expert's."""
    router = model.model.router
    saved = {k: v.clone() for k, v in router.state_dict().items()}
    correct = evaluate_task(model, _datamodule(root, 0), 0)
    try:
        for key, name in zip(("1", "0"), TASKS, strict=True):
            train = sorted((root / name / "train" / "good").glob("*.png"))
            router.fit(key, pool_features(_features(model, torch.stack([read_image(p) for p in train]))))
        out = evaluate_task(model, _datamodule(root, 0), 0)
        assert out["routing_accuracy"] == 0.0
        assert out["routed"] == pytest.approx(_expected(model, root, 0, key="1"), abs=METRIC_TOLERANCE)
        assert out["oracle"] == pytest.approx(correct["oracle"], abs=1e-12)
        assert out["routed"]["pixel_AP"] < correct["routed"]["pixel_AP"]  # the wrong expert is worse
    finally:
        router.load_state_dict(saved)
    assert evaluate_task(model, _datamodule(root, 0), 0)["routing_accuracy"] == 1.0


def test_unknown_products_count_as_misrouted_and_score_as_anomalous(model: MoLEFlow, root: Path) -> None:
    router = model.model.router
    router.unknown_threshold = 1e-9  # every image is farther than that from every prototype
    try:
        out = evaluate_task(model, _datamodule(root, 1), 1)
    finally:
        router.unknown_threshold = None
    assert out["routing_accuracy"] == 0.0
    assert out["routed"]["image_AUROC"] == 0.5  # all scored 1.0: ties
    assert out["oracle"] == pytest.approx(_expected(model, root, 1, key="1"), abs=METRIC_TOLERANCE)


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored(model: MoLEFlow, root: Path, training: bool) -> None:
    model.train(training)
    try:
        evaluate_task(model, _datamodule(root, 0), 0)
        assert model.training is training
    finally:
        model.eval()


def test_image_f1_is_left_out_for_raw_scores(model: MoLEFlow, root: Path) -> None:
    with model.model.raw_scores():
        out = evaluate_task(model, _datamodule(root, 0), 0)
    assert set(out["routed"]) == set(out["oracle"]) == METRICS - {"image_F1"}


def test_task_thresholds_raw_and_normalised(model: MoLEFlow) -> None:
    stored = model.model.thresholds.values("1")
    values = task_thresholds(model, 1)
    assert values == {
        "image_threshold": stored["image_threshold"], "image_threshold_normalized": 0.5,
        "pixel_threshold": stored["pixel_threshold"], "pixel_threshold_normalized": 0.5,
    }  # fmt: skip
    assert task_thresholds(model, 1, pixel_fitted=False)["pixel_threshold"] is None
    model.model.thresholds.add_task("2")  # an expert whose thresholds are not fitted
    try:
        model.model.task_keys.append("2")
        assert task_thresholds(model, 2) is None
    finally:
        model.model.task_keys.remove("2")
        del model.model.thresholds.tasks["2"]
