"""Synthetic products in the MVTec AD folder layout, for tests, benchmarks and notebooks.

Each product is drawn from a :class:`Style` (base colour + texture); defects are grainy blobs of a
contrasting colour, with their masks::

    <root>/<name>/train/good/000.png ...
    <root>/<name>/test/good/000.png ...
    <root>/<name>/test/<defect>/000.png ...
    <root>/<name>/ground_truth/<defect>/000_mask.png ...

:data:`PRODUCTS` holds fifteen products that differ in colour and texture or period (the scale
benchmark's stream); :data:`STYLES` are its first four. The textured products' random phase gives
each product's images some spread; a plain product (``gray_plain``) has almost none, so the
prototype router's covariance for it is tiny and its *defective* images can land nearer another
product's prototype.

Example:
    >>> from anomalib_moleflow.data.synthetic import make_stream
    >>> root = make_stream("/tmp/products", ["red_stripes", "blue_checker"])  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "LOOKALIKE_PRODUCTS",
    "PRODUCTS",
    "STREAMS",
    "STYLES",
    "Style",
    "make_products",
    "make_stream",
    "make_task",
    "product_image",
]


@dataclass(frozen=True)
class Style:
    """Look of one synthetic product."""

    color: tuple[int, int, int]
    """Base RGB colour."""
    pattern: str = "stripes"
    """``stripes`` (diagonal), ``checker``, ``dots`` or ``plain``."""
    period: float = 8.0
    """Pattern period in pixels."""
    defect_color: tuple[int, int, int] = (20, 200, 20)
    defect: str = "blob"
    """``blob``: a grainy disc of ``defect_color``, a sixth to a tenth of the image wide; ``small``: a
    disc of a twentieth to a twelfth, darker than the product; ``scratch``: a thin dark line."""


#: Products that differ in colour *and* texture (routing on them should be trivial).
STYLES: dict[str, Style] = {
    "red_stripes": Style(color=(200, 60, 50), pattern="stripes", period=8.0, defect_color=(30, 200, 220)),
    "blue_checker": Style(color=(50, 80, 200), pattern="checker", period=16.0, defect_color=(240, 220, 40)),
    "green_dots": Style(color=(60, 170, 70), pattern="dots", period=12.0, defect_color=(230, 40, 200)),
    "gray_plain": Style(color=(128, 128, 128), pattern="plain", defect_color=(250, 250, 250)),
}


def _texture(style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, size)`` float texture in about ``[0.6, 1.4]`` with a random phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shift = rng.uniform(0, style.period, size=2)
    yy, xx = yy + shift[0], xx + shift[1]
    if style.pattern == "stripes":
        t = np.sin(2 * np.pi * (xx + yy) / style.period)
    elif style.pattern == "checker":
        t = np.sign(np.sin(2 * np.pi * xx / style.period) * np.sin(2 * np.pi * yy / style.period))
    elif style.pattern == "dots":
        t = np.cos(2 * np.pi * xx / style.period) * np.cos(2 * np.pi * yy / style.period)
        t = np.where(t > 0.5, 1.0, -0.5)
    elif style.pattern == "plain":
        t = np.zeros((size, size), dtype=np.float32)
    else:
        msg = f"unknown pattern {style.pattern!r}"
        raise ValueError(msg)
    return 1.0 + 0.4 * t


def product_image(
    style: Style, rng: np.random.Generator, size: int = 64, defect: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(size, size, 3) uint8`` of ``style`` and its mask ``(size, size) uint8`` in {0, 255}."""
    texture = _texture(style, size, rng)
    image = texture[..., None] * np.asarray(style.color, dtype=np.float32)
    image += rng.normal(0, 4, size=image.shape)
    mask = np.zeros((size, size), dtype=np.uint8)
    if defect and style.defect != "blob":
        _realistic_defect(style, image, mask, rng)
    elif defect:
        yy, xx = np.mgrid[0:size, 0:size]
        margin = size // 4
        cy, cx = rng.integers(margin, size - margin, size=2)
        radius = int(rng.integers(max(2, size // 10), max(3, size // 6)))
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        # a grainy blob of a contrasting colour: colour and texture both differ from the product
        grain = rng.uniform(0.4, 1.4, size=(int(blob.sum()), 1))
        image[blob] = np.asarray(style.defect_color, dtype=np.float32) * grain
        mask[blob] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _realistic_defect(style: Style, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Paint a small dark spot or a thin scratch in the product's own colour, in place."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    if style.defect == "small":
        cy, cx = rng.integers(size // 6, size - size // 6, size=2)
        radius = int(rng.integers(max(2, size // 20), max(3, size // 12)))
        region = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif style.defect == "scratch":
        (y0, x0), angle = rng.integers(size // 5, 4 * size // 5, size=2), rng.uniform(0, np.pi)
        length, width = rng.uniform(size / 5, size / 2.5), max(1.0, size / 96)
        dy, dx = np.sin(angle), np.cos(angle)
        along = (yy - y0) * dy + (xx - x0) * dx
        across = np.abs(-(yy - y0) * dx + (xx - x0) * dy)
        region = (np.abs(along) <= length / 2) & (across <= width)
    else:
        msg = f"unknown defect {style.defect!r}; use 'blob', 'small' or 'scratch'"
        raise ValueError(msg)
    image[region] *= rng.uniform(0.35, 0.6)
    mask[region] = 255


def make_task(
    root: str | Path,
    name: str,
    style: Style | str | None = None,
    n_train: int = 12,
    n_good: int = 3,
    n_defect: int = 3,
    size: int = 64,
    defect_name: str = "blob",
    seed: int = 0,
) -> Path:
    """Write the MVTec AD-layout folder ``root/name`` and return it.

    Args:
        root: Folder that holds the task folders (the stream's ``data.root``).
        name: Category folder name.
        style: A :class:`Style`, a key of :data:`PRODUCTS`, or ``None`` for ``PRODUCTS[name]``.
        n_train: Defect-free training images.
        n_good: Defect-free test images.
        n_defect: Defective test images (each with a mask).
        size: Image side in pixels.
        defect_name: Defect type folder name.
        seed: Random seed (images are reproducible).
    """
    if style is None:
        style = name
    if isinstance(style, str):
        if style not in PRODUCTS:
            msg = f"unknown synthetic product {style!r}; known: {', '.join(PRODUCTS)}"
            raise KeyError(msg)
        style = PRODUCTS[style]
    rng = np.random.default_rng(seed)
    task = Path(root) / name
    folders = {
        "train": task / "train" / "good",
        "good": task / "test" / "good",
        "defect": task / "test" / defect_name,
        "mask": task / "ground_truth" / defect_name,
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(product_image(style, rng, size)[0]).save(folders["train"] / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(product_image(style, rng, size)[0]).save(folders["good"] / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = product_image(style, rng, size, defect=True)
        Image.fromarray(image).save(folders["defect"] / f"{i:03d}.png")
        Image.fromarray(mask).save(folders["mask"] / f"{i:03d}_mask.png")
    return task


def make_stream(root: str | Path, names: list[str] | tuple[str, ...], **kwargs: object) -> Path:
    """:func:`make_task` for each name (a key of :data:`PRODUCTS`), seeded by its position; returns ``root``."""
    for index, name in enumerate(names):
        make_task(root, name, seed=index, **kwargs)  # type: ignore[arg-type]
    return Path(root)


def _contrast(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """A defect colour far from ``color``: its complement, or green/white when that is too close."""
    complement = tuple(255 - c for c in color)
    if sum(abs(a - b) for a, b in zip(color, complement, strict=True)) >= 200:
        return complement  # type: ignore[return-value]
    return (20, 200, 20) if sum(color) > 300 else (250, 250, 250)


def _style(color: tuple[int, int, int], pattern: str, period: float = 8.0) -> Style:
    return Style(color=color, pattern=pattern, period=period, defect_color=_contrast(color))


#: Product name -> look, in stream order; the first four are :data:`STYLES`.
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


def _family(color: tuple[int, int, int], pattern: str, period: float, defect: str) -> Style:
    return Style(color=color, pattern=pattern, period=period, defect_color=color, defect=defect)


#: Fifteen look-alike products in five families of three: one pattern in colour variants (the
#: stripes and dots families), one colour in period variants (the checker families), one colour and
#: pattern with near periods (the fine-stripes family). Defects are small dark spots or thin
#: scratches in the product's own colour, as real defects are (a minority of the patches).
LOOKALIKE_PRODUCTS: dict[str, Style] = {
    "stripes_red": _family((200, 60, 50), "stripes", 12.0, "small"),
    "stripes_orange": _family((215, 110, 45), "stripes", 12.0, "scratch"),
    "stripes_pink": _family((210, 90, 110), "stripes", 12.0, "small"),
    "checker_blue_8": _family((50, 80, 200), "checker", 8.0, "scratch"),
    "checker_blue_12": _family((50, 80, 200), "checker", 12.0, "small"),
    "checker_blue_16": _family((50, 80, 200), "checker", 16.0, "scratch"),
    "dots_green": _family((60, 170, 70), "dots", 12.0, "small"),
    "dots_teal": _family((40, 160, 130), "dots", 12.0, "scratch"),
    "dots_olive": _family((120, 150, 50), "dots", 12.0, "small"),
    "checker_gray_10": _family((140, 140, 140), "checker", 10.0, "small"),
    "checker_gray_14": _family((140, 140, 140), "checker", 14.0, "scratch"),
    "checker_gray_20": _family((140, 140, 140), "checker", 20.0, "small"),
    "fine_stripes_6": _family((180, 160, 90), "stripes", 6.0, "scratch"),
    "fine_stripes_7": _family((180, 160, 90), "stripes", 7.0, "small"),
    "fine_stripes_8": _family((180, 160, 90), "stripes", 8.0, "scratch"),
}
STREAMS: dict[str, dict[str, Style]] = {"distinct": PRODUCTS, "lookalike": LOOKALIKE_PRODUCTS}
"""The synthetic streams by name."""


def make_products(
    root: str | Path,
    n_tasks: int,
    n_train: int = 16,
    n_test: int = 8,
    size: int = 256,
    seed: int = 0,
    stream: str = "distinct",
) -> list[str]:
    """Write the first ``n_tasks`` products of a stream (:data:`STREAMS`: ``distinct`` =
    :data:`PRODUCTS`, ``lookalike`` = :data:`LOOKALIKE_PRODUCTS`) under ``root``; return their names.

    Each product gets ``n_train`` normal training images and ``n_test`` test images, half
    of them (rounded down, at least one) defective with masks, the rest good (at least one).
    """
    if stream not in STREAMS:
        msg = f"unknown synthetic stream {stream!r}; streams: {', '.join(STREAMS)}"
        raise ValueError(msg)
    products = STREAMS[stream]
    if not 1 <= n_tasks <= len(products):
        msg = f"n_tasks must be in [1, {len(products)}], got {n_tasks}"
        raise ValueError(msg)
    if n_test < 2:
        msg = f"n_test must be >= 2 (one good and one defective image), got {n_test}"
        raise ValueError(msg)
    n_defect = max(1, n_test // 2)
    names = list(products)[:n_tasks]
    for index, name in enumerate(names):
        make_task(
            root, name, style=products[name], n_train=n_train, n_good=n_test - n_defect, n_defect=n_defect,
            size=size, seed=seed + index,
        )  # fmt: skip
    return names
