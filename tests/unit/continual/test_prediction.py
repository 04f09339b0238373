"""Prediction with a continual model: image lookup, routed rows in mixed batches, labels at each
product's threshold, unknown products, overlays and the CSV / JSON files.

The model is tiny and untrained; each product's statistics and thresholds are fitted by hand from
its images (all that routing and scoring need). The two synthetic products differ in colour and
texture, so routing them is trivial.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_image, task_test_images
from PIL import Image

from anomalib_moleflow.continual.prediction import (
    UNKNOWN_PRODUCT,
    find_images,
    load_image,
    load_model,
    predict_images,
    write_rows,
)
from anomalib_moleflow.continual.runner import build_model
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig

TASKS = ("red_stripes", "blue_checker")


def _features(model: MoLEFlow, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.extract_features(model.pre_processor.transform(images))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stream(
        tmp_path_factory.mktemp("products"), TASKS, n_train=8, n_good=2, n_defect=2
    )


@pytest.fixture(scope="module")
def mixed(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    """Both products' test images in one folder (interleaved by name) -> their product."""
    folder = tmp_path_factory.mktemp("mixed")
    truth = {}
    for name in TASKS:
        for path in task_test_images(root, name):
            target = folder / path.parent.name / f"{path.stem}_{name}.png"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(path, target)
            truth[target] = name
    return truth


@pytest.fixture(scope="module")
def model(root: Path, tiny_config: MoLEFlowConfig) -> Iterator[MoLEFlow]:
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    for name in TASKS:
        key = model.add_task(name)
        train = sorted((root / name / "train" / "good").glob("*.png"))
        model.model.fit_task_statistics(
            key, [_features(model, torch.stack([read_image(p) for p in train]))]
        )
        paths = task_test_images(root, name)
        labels = torch.tensor([int(p.parent.name != "good") for p in paths])
        with torch.no_grad(), model.model.oracle(key), model.model.raw_scores():
            raw = model.model.predict_features(
                _features(model, torch.stack([read_image(p) for p in paths]))
            )
        model.model.fit_task_thresholds(
            key, raw.pred_score, raw.anomaly_map[:, 0], labels, None
        )
    assert model.model.routing_active
    yield model


# ----------------------------------------------------------------------------- finding and reading images
def test_find_images_of_a_file_a_folder_and_a_glob(
    mixed: dict[Path, str], tmp_path: Path
) -> None:
    folder = next(iter(mixed)).parent.parent
    everything = sorted(mixed)
    (folder / "notes.txt").write_text("not an image")
    assert find_images(folder) == everything  # recursive, sorted, non-images left out
    assert find_images(everything[0]) == [everything[0]]
    assert find_images(str(folder / "*" / "*_blue_checker.png")) == [
        p for p in everything if mixed[p] == "blue_checker"
    ]
    assert find_images(str(folder / "**" / "*.png")) == everything
    with pytest.raises(
        FileNotFoundError,
        match=r"no images matched --data '.*nothing\*\.png' \(pattern",
    ):
        find_images(str(tmp_path / "nothing*.png"))
    with pytest.raises(
        FileNotFoundError, match=r"no images matched --data '.*' \(folder"
    ):
        find_images(tmp_path)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(OSError, match=rf"cannot read image '{bad}'"):
        load_image(bad)
    good = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 51, np.uint8), mode="L").save(good)
    image = load_image(good)
    assert image.shape == (3, 5, 7) and torch.allclose(
        image, torch.full((3, 5, 7), 0.2)
    )


def test_missing_model_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=rf"--model '{tmp_path / 'no_run'}' does not exist"
    ):
        load_model(tmp_path / "no_run")


# ----------------------------------------------------------------------------- predictions
def test_mixed_batches_are_routed_and_scored_per_product(
    model: MoLEFlow, mixed: dict[Path, str], tmp_path: Path
) -> None:
    paths = sorted(mixed)
    rows = predict_images(
        model, paths, tmp_path / "out", batch_size=3, progress=False
    )  # batches mix products
    assert [row.path for row in rows] == [str(p) for p in paths]
    assert [row.product for row in rows] == [mixed[p] for p in paths]
    # the same scores as the model's own routed, normalised output
    images = torch.stack([read_image(p) for p in paths])
    with torch.no_grad():
        expected = model.model.predict_features(_features(model, images))
    assert [row.score for row in rows] == pytest.approx(
        expected.pred_score.tolist(), abs=1e-5
    )
    thresholds = model.model.thresholds
    for row, index in zip(rows, expected.pred_task.tolist(), strict=True):
        key = model.model.task_keys[index]
        raw_threshold = thresholds.values(key)["image_threshold"]
        assert row.threshold_raw == raw_threshold and row.threshold == 0.5
        normalized, _ = thresholds.normalize(
            key, torch.tensor([row.score_raw]), torch.zeros(1, 1, 1)
        )
        assert row.score == pytest.approx(float(normalized[0]), abs=1e-6)
        assert row.label == ("anomalous" if row.score_raw > raw_threshold else "normal")
    assert {row.label for row in rows} == {"anomalous", "normal"}
    for row in rows:  # non-blank pictures of the image, its overlay and the text
        assert (
            row.overlay is not None
            and Path(row.overlay).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        )
        picture = np.asarray(Image.open(row.overlay).convert("RGB"))
        assert picture.shape == (256, 512, 3) and picture.std() > 10
    for row, path in zip(
        rows, paths, strict=True
    ):  # named as the images below their common folder
        assert (
            Path(row.overlay)
            == tmp_path / "out" / "overlays" / path.parent.name / path.name
        )


def test_unknown_products_are_labelled_unknown(
    model: MoLEFlow, mixed: dict[Path, str], tmp_path: Path
) -> None:
    router = model.model.router
    router.unknown_threshold = (
        1e-9  # every image is farther than that from every product
    )
    try:
        rows = predict_images(
            model, sorted(mixed)[:3], tmp_path, overlays=True, progress=False
        )
    finally:
        router.unknown_threshold = None
    assert {
        (row.product, row.label, row.score, row.score_raw, row.threshold)
        for row in rows
    } == {(UNKNOWN_PRODUCT, UNKNOWN_PRODUCT, None, None, None)}
    assert all(Path(row.overlay).is_file() for row in rows)


def test_rows_written_as_csv_and_json(
    model: MoLEFlow, mixed: dict[Path, str], tmp_path: Path
) -> None:
    rows = predict_images(
        model, sorted(mixed)[:4], tmp_path, overlays=False, progress=False
    )
    assert (
        all(row.overlay is None for row in rows)
        and not (tmp_path / "overlays").exists()
    )
    paths = write_rows(rows, tmp_path / "written", {"model": "m.ckpt"})
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [
        "path",
        "product",
        "score_raw",
        "score",
        "threshold_raw",
        "threshold",
        "label",
        "overlay",
    ]
    assert [r["product"] for r in table] == [row.product for row in rows]
    assert [float(r["score"]) for r in table] == pytest.approx(
        [row.score for row in rows]
    )
    assert table[0]["overlay"] == ""
    data = json.loads(paths["json"].read_text())
    assert data["model"] == "m.ckpt" and len(data["rows"]) == 4
    assert (
        data["rows"][1]["score_raw"] == rows[1].score_raw
        and data["rows"][1]["overlay"] is None
    )
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        predict_images(model, sorted(mixed)[:1], batch_size=0, progress=False)
