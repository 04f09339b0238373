"""The synthetic MVTec-layout products that the tests, benchmarks and notebooks train on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from anomalib_moleflow.data import MVTecADLocal, check_mvtec_layout
from anomalib_moleflow.data.synthetic import (
    PRODUCTS,
    STYLES,
    Style,
    make_products,
    make_stream,
    make_task,
    product_image,
)

LEGACY_EXPECTED = REPO / "tests" / "fixtures" / "legacy_v1" / "expected.pt"


def _pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of the decoded pixels, for every PNG under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(_pixels(p).tobytes()).hexdigest() for p in sorted(root.rglob("*.png"))
    }


def test_products_and_styles() -> None:
    assert len(PRODUCTS) == 15
    assert list(PRODUCTS)[:4] == list(STYLES) == ["red_stripes", "blue_checker", "green_dots", "gray_plain"]
    assert all(PRODUCTS[name] is STYLES[name] for name in STYLES)
    looks = {(s.color, s.pattern, s.period) for s in PRODUCTS.values()}
    assert len(looks) == 15  # every product looks different
    for style in PRODUCTS.values():  # the defect colour stands out from the product
        assert sum(abs(a - b) for a, b in zip(style.color, style.defect_color, strict=True)) >= 100, style


def test_product_image_and_mask() -> None:
    style = STYLES["red_stripes"]
    image, mask = product_image(style, np.random.default_rng(0), size=48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8 and not mask.any()
    image, mask = product_image(style, np.random.default_rng(1), size=48, defect=True)
    assert set(np.unique(mask).tolist()) == {0, 255}
    blob = mask == 255
    # the defect pixels move toward the defect colour, away from the product colour
    inside, outside = image[blob].astype(float).mean(0), image[~blob].astype(float).mean(0)
    assert np.abs(inside - np.asarray(style.defect_color)).sum() < np.abs(outside - np.asarray(style.defect_color)).sum()
    plain, _ = product_image(STYLES["gray_plain"], np.random.default_rng(0), size=32)
    assert abs(float(plain.mean()) - 128) < 3  # plain: the base colour plus a little noise
    with pytest.raises(ValueError, match="unknown pattern 'zigzag'"):
        product_image(Style(color=(1, 2, 3), pattern="zigzag"), np.random.default_rng(0))


def test_make_task_layout(tmp_path: Path) -> None:
    task = make_task(tmp_path, "widget", style="blue_checker", n_train=3, n_good=2, n_defect=1, size=32, defect_name="dent")
    assert task == tmp_path / "widget"
    assert sorted(_tree(tmp_path)) == [
        "widget/ground_truth/dent/000_mask.png",
        "widget/test/dent/000.png",
        "widget/test/good/000.png",
        "widget/test/good/001.png",
        "widget/train/good/000.png",
        "widget/train/good/001.png",
        "widget/train/good/002.png",
    ]
    assert _pixels(task / "train" / "good" / "000.png").shape == (32, 32, 3)
    mask = _pixels(task / "ground_truth" / "dent" / "000_mask.png")
    assert mask.shape == (32, 32) and mask.max() == 255
    assert check_mvtec_layout(tmp_path, "widget") == task  # what the datamodule reads
    datamodule = MVTecADLocal(root=tmp_path, category="widget", num_workers=0, train_batch_size=3, eval_batch_size=3)
    datamodule.setup()
    assert len(datamodule.train_data) == 3 and len(datamodule.test_data) == 3


def test_unknown_product_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"unknown synthetic product 'purple_stripes'.*red_stripes"):
        make_task(tmp_path, "purple_stripes")
    with pytest.raises(KeyError, match="'nope'"):
        make_task(tmp_path, "widget", style="nope")


def test_reproducible_and_seeded(tmp_path: Path) -> None:
    kwargs = {"n_train": 2, "n_good": 1, "n_defect": 1, "size": 32}
    make_task(tmp_path / "a", "green_dots", **kwargs)
    make_task(tmp_path / "b", "green_dots", **kwargs)
    make_task(tmp_path / "c", "green_dots", seed=1, **kwargs)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a").values() != _tree(tmp_path / "c").values()
    # a stream seeds each product by its position
    names = ["green_dots", "orange_checker"]
    assert make_stream(tmp_path / "stream", names, **kwargs) == tmp_path / "stream"
    make_task(tmp_path / "by_hand", "green_dots", seed=0, **kwargs)
    make_task(tmp_path / "by_hand", "orange_checker", seed=1, **kwargs)
    assert _tree(tmp_path / "stream") == _tree(tmp_path / "by_hand")


def test_same_images_as_before_the_merge(tmp_path: Path) -> None:
    """The generator draws the images the old ``tests/synthetic_mvtec.py`` drew: the legacy fixture
    stored the test images of its ``make_stream(root, ("red_stripes", "blue_checker"), n_train=16)``."""
    expected = torch.load(LEGACY_EXPECTED, weights_only=True)["inputs"]
    root = make_stream(tmp_path, ["red_stripes", "blue_checker"], n_train=16)
    paths = [p for name in ("red_stripes", "blue_checker") for p in sorted((root / name / "test").glob("*/*.png"))]
    images = torch.stack([torch.from_numpy(_pixels(p)).permute(2, 0, 1) for p in paths])
    assert images.dtype == torch.uint8 and torch.equal(images, expected)


def test_make_products(tmp_path: Path) -> None:
    names = make_products(tmp_path, n_tasks=3, n_train=2, n_test=5, size=32, seed=4)
    assert names == list(PRODUCTS)[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert len(list((tmp_path / name / "train" / "good").glob("*.png"))) == 2
        assert len(list((tmp_path / name / "test" / "good").glob("*.png"))) == 3
        assert len(list((tmp_path / name / "test" / "blob").glob("*.png"))) == 2
        assert len(list((tmp_path / name / "ground_truth" / "blob").glob("*_mask.png"))) == 2
    # product i is seeded seed + i
    make_task(tmp_path / "ref", names[2], n_train=2, n_good=3, n_defect=2, size=32, seed=6)
    assert _tree(tmp_path / "ref") == {k: v for k, v in _tree(tmp_path).items() if k.startswith(names[2] + "/")}
    make_products(tmp_path / "all", n_tasks=15, n_train=1, n_test=2, size=8)
    assert len(list((tmp_path / "all").iterdir())) == 15
    with pytest.raises(ValueError, match=r"n_tasks must be in \[1, 15\], got 16"):
        make_products(tmp_path, n_tasks=16)
    with pytest.raises(ValueError, match=r"n_tasks must be in \[1, 15\], got 0"):
        make_products(tmp_path, n_tasks=0)
    with pytest.raises(ValueError, match="n_test must be >= 2"):
        make_products(tmp_path, n_tasks=1, n_test=1)


def test_lookalike_stream_has_families_and_small_defects(tmp_path: Path) -> None:
    from anomalib_moleflow.data.synthetic import LOOKALIKE_PRODUCTS, STREAMS, make_products

    assert len(LOOKALIKE_PRODUCTS) == 15 and STREAMS["lookalike"] is LOOKALIKE_PRODUCTS
    looks = [(s.color, s.pattern, s.period) for s in LOOKALIKE_PRODUCTS.values()]
    assert len(set(looks)) == 15  # every product differs ...
    assert len({(c, p) for c, p, _ in looks}) < 15 and len({p for _, p, _ in looks}) <= 3  # ... within families
    names = make_products(tmp_path, 3, n_train=2, n_test=4, size=128, stream="lookalike")
    assert names == list(LOOKALIKE_PRODUCTS)[:3]
    for name in names:
        masks = sorted((tmp_path / name / "ground_truth").glob("*/*.png"))
        assert len(masks) == 2
        for mask in masks:
            share = (np.array(Image.open(mask)) > 0).mean()
            assert 0 < share < 0.05, (mask, share)  # a minority of the patches, as real defects are
    with pytest.raises(ValueError, match="unknown synthetic stream 'other'"):
        make_products(tmp_path, 1, stream="other")
