"""Check every file of a task stream before any training: the images and masks anomalib will read.

Each task's datamodule is set up (so the sample lists, and anomalib's own pairing of images and
masks, are exactly what training and evaluation will use); then every image and mask is decoded
in parallel, with a progress bar on a terminal. Every problem of every task is reported at once,
in one message: a file that cannot be decoded, a 16-bit image (anomalib reads 8-bit RGB and would
clip it), a mask whose size differs from its image's. Training images that are (nearly) constant
raise a warning: a model cannot learn what normal looks like from them.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .task_stream import TaskStream

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
CONSTANT_STD = 2.0 / 255.0
"""Training images whose pixel standard deviation stays below this (on a 0-1 scale) count as constant."""


@dataclass(frozen=True)
class _Sample:
    task: str
    image: str
    mask: str | None
    train: bool


@dataclass(frozen=True)
class _Result:
    problem: str | None
    std: float | None
    size: tuple[int, int] | None = None


def _check(sample: _Sample) -> _Result:
    try:
        with Image.open(sample.image) as image:
            image.load()
            mode, size = image.mode, image.size
            std = float(np.asarray(image.convert("L").resize((32, 32)), dtype=np.float32).std() / 255.0) if sample.train else None
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        return _Result(f"'{sample.image}' cannot be decoded ({type(exc).__name__}: {exc})", None)
    if mode in SIXTEEN_BIT_MODES:
        return _Result(f"'{sample.image}' is a {mode} (16-bit or float) image; anomalib reads 8-bit images and would clip it: convert it to 8-bit", None)
    if sample.mask:
        try:
            with Image.open(sample.mask) as mask:
                mask.load()
                mask_size = mask.size
        except Exception as exc:  # noqa: BLE001
            return _Result(f"mask '{sample.mask}' cannot be decoded ({type(exc).__name__}: {exc})", std)
        if mask_size != size:
            return _Result(
                f"mask '{sample.mask}' is {mask_size[0]}x{mask_size[1]} but its image '{sample.image}' is {size[0]}x{size[1]}", std
            )
    return _Result(None, std, size)


def _samples(stream: TaskStream, index: int) -> list[_Sample]:
    """Every image (and mask) the task's datamodule will read; ``ValueError`` naming the task when
    anomalib cannot even list them (e.g. masks that do not pair with their images)."""
    name = stream.names[index]
    datamodule = stream.datamodule(index)
    try:
        datamodule.setup("fit")
    except Exception as exc:  # noqa: BLE001 - anomalib's own errors (MisMatchError, ...) become one line
        msg = f"task {index} '{name}': {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
        raise ValueError(msg) from exc
    out = []
    for dataset, train in ((datamodule.train_data, True), (datamodule.test_data, False)):
        for row in dataset.samples.itertuples():
            mask = getattr(row, "mask_path", None)
            out.append(_Sample(name, str(row.image_path), mask if isinstance(mask, str) and mask else None, train))
    return out


def check_stream_files(stream: TaskStream, workers: int = 8) -> None:
    """Decode every image and mask of ``stream``; raise one ``ValueError`` listing every bad file."""
    samples = [sample for index in range(len(stream)) for sample in _samples(stream, index)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(_check, samples), total=len(samples), desc="checking files", unit="file", disable=None, leave=False))
    problems = [f"task '{s.task}': {r.problem}" for s, r in zip(samples, results, strict=True) if r.problem]
    if problems:
        msg = f"{len(problems)} bad file(s) in the task stream: " + "; ".join(problems)
        raise ValueError(msg)
    for task in stream.names:
        _warn_mixed_sizes(task, [r.size for s, r in zip(samples, results, strict=True) if s.task == task and r.size])
        stds = [r.std for s, r in zip(samples, results, strict=True) if s.task == task and r.std is not None]
        if stds and max(stds) < CONSTANT_STD:
            text = (
                f"task '{task}': its {len(stds)} training images are (nearly) constant (largest pixel standard "
                f"deviation {max(stds):.4f}); a model cannot learn what normal looks like from them"
            )
            warnings.warn(text, stacklevel=2)
            logger.warning(text)


def _warn_mixed_sizes(task: str, sizes: list[tuple[int, int]]) -> None:
    """Images of several sizes are all resized to the model's square input: say so, since the
    aspect ratio of some of them then changes."""
    distinct = sorted(set(sizes))
    if len(distinct) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in distinct[:4]) + (", ..." if len(distinct) > 4 else "")
        text = (
            f"task '{task}': its images come in {len(distinct)} sizes ({shown}); every image is resized to the "
            "model's input size, so objects in images of another aspect ratio are stretched"
        )
        warnings.warn(text, stacklevel=3)
        logger.warning(text)
