"""Fifteen visually distinct synthetic products in the MVTec AD layout, for the scale benchmark.

``tests/synthetic_mvtec.py`` draws products from a :class:`Style` (base colour + texture) and
paints defects as contrasting blobs with masks; it ships four styles. This module adds eleven
more (each differs from the others in colour and texture or period, so routing stays meaningful)
and reuses that module's :func:`make_task` for the images, masks and folder layout.

The added products are all textured: a texture's random phase gives the images of a product
some spread. A plain product (the shared ``gray_plain``) has almost none, so the prototype
router's covariance for it is tiny and its *defective* images can land nearer another
product's prototype (seen in the benchmark: gray_plain's defective images went to
blue_checker); the scale benchmark keeps it, and reports routing per task.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from synthetic_mvtec import STYLES, Style, make_task  # noqa: E402

__all__ = ["PRODUCTS", "make_products"]


def _contrast(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """A defect colour far from ``color``: its complement, or green/white when that is too close."""
    complement = tuple(255 - c for c in color)
    if sum(abs(a - b) for a, b in zip(color, complement, strict=True)) >= 200:
        return complement  # type: ignore[return-value]
    return (20, 200, 20) if sum(color) > 300 else (250, 250, 250)


def _style(color: tuple[int, int, int], pattern: str, period: float = 8.0) -> Style:
    return Style(color=color, pattern=pattern, period=period, defect_color=_contrast(color))


#: Product name -> look, in stream order. The first four are the test suite's :data:`STYLES`.
PRODUCTS: dict[str, Style] = {
    **STYLES,
    "orange_checker": _style((230, 130, 30), "checker", 8.0),
    "yellow_stripes": _style((220, 210, 60), "stripes", 16.0),
    "purple_dots": _style((130, 50, 170), "dots", 8.0),
    "teal_stripes": _style((30, 150, 150), "stripes", 12.0),
    "pink_stripes": _style((240, 150, 190), "stripes", 20.0),
    "brown_checker": _style((120, 70, 30), "checker", 24.0),
    "navy_dots": _style((25, 30, 90), "dots", 20.0),
    "olive_stripes": _style((110, 120, 30), "stripes", 24.0),
    "cyan_checker": _style((90, 220, 240), "checker", 12.0),
    "cream_dots": _style((240, 230, 200), "dots", 16.0),
    "lime_checker": _style((160, 230, 40), "checker", 20.0),
}


def make_products(
    root: str | Path,
    n_tasks: int,
    n_train: int = 16,
    n_test: int = 8,
    size: int = 256,
    seed: int = 0,
) -> list[str]:
    """Write the first ``n_tasks`` products of :data:`PRODUCTS` under ``root``; return their names.

    Each product gets ``n_train`` normal training images and ``n_test`` test images, half
    of them (rounded down, at least one) defective with masks, the rest good (at least one).
    """
    if not 1 <= n_tasks <= len(PRODUCTS):
        msg = f"n_tasks must be in [1, {len(PRODUCTS)}], got {n_tasks}"
        raise ValueError(msg)
    if n_test < 2:
        msg = f"n_test must be >= 2 (one good and one defective image), got {n_test}"
        raise ValueError(msg)
    n_defect = max(1, n_test // 2)
    names = list(PRODUCTS)[:n_tasks]
    for index, name in enumerate(names):
        make_task(
            root, name, style=PRODUCTS[name], n_train=n_train, n_good=n_test - n_defect, n_defect=n_defect,
            size=size, seed=seed + index,
        )  # fmt: skip
    return names
