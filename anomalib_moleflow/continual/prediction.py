"""Score images with a continual model: the product each image is routed to, its raw and normalised
score and its label at that product's threshold, as CSV and JSON rows, with heatmap overlays.

    rows = predict_images(model, find_images("parts/"), output_dir="predictions")

Images of different products go through one batch: the router picks each image's expert, and each
expert scores its own images. With ``unknown_threshold`` an image far from every product is labelled
``unknown`` (no score). Overlays are drawn by anomalib's :class:`~anomalib.visualization.ImageVisualizer`.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from anomalib_moleflow.io import atomic_open, atomic_write_json, atomic_write_text
from anomalib_moleflow.models.moleflow import MoLEFlow
from anomalib_moleflow.models.moleflow.routing import UNKNOWN

from .run_checkpoint import latest_checkpoint

__all__ = [
    "UNKNOWN_PRODUCT",
    "PredictionRow",
    "find_images",
    "load_image",
    "load_model",
    "predict_images",
    "write_rows",
]

UNKNOWN_PRODUCT = "unknown"
"""Product (and label) of an image the router flags as no known product."""
TEXT_SIZE = 15
"""Font size of the overlay's text (pixels, on 256-pixel panels)."""
CSV_FIELDS = (
    "path",
    "product",
    "score_raw",
    "score",
    "threshold_raw",
    "threshold",
    "label",
    "overlay",
)


@dataclass
class PredictionRow:
    """One image's prediction (scores ``None`` for an unknown product or an unfitted threshold)."""

    path: str
    product: str
    """Task name of the expert the image was routed to, or ``unknown``."""
    score_raw: float | None
    score: float | None
    """Score normalised by the product's thresholds (its threshold at 0.5)."""
    threshold_raw: float | None
    threshold: float | None
    label: str
    """``anomalous`` (score above the threshold), ``normal``, ``unknown``, or empty without a threshold."""
    overlay: str | None = None


def load_model(
    path: str | Path, unknown_threshold: float | None = None
) -> tuple[MoLEFlow, Path]:
    """The model (routing among all experts) of a run folder's last task checkpoint or of a checkpoint
    file, and that file; ``unknown_threshold`` sets the router's unknown-product flag."""
    path = Path(path)
    if not path.exists():
        msg = (
            f"--model '{path}' does not exist (give a run folder or a task checkpoint)"
        )
        raise FileNotFoundError(msg)
    checkpoint = latest_checkpoint(path)
    model = MoLEFlow.from_checkpoint(checkpoint, evaluator=False, visualizer=False)
    if unknown_threshold is not None:
        if model.model.router is None or model.model.num_tasks < 2:
            msg = f"--unknown-threshold needs a model that routes among two or more products; '{checkpoint}' has {model.model.num_tasks}"
            raise ValueError(msg)
        model.model.router.unknown_threshold = float(unknown_threshold)
    return model, checkpoint


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


def find_images(spec: str | Path) -> list[Path]:
    """Images of ``spec``: one image file, every image under a folder (recursively), or a glob pattern
    (``**`` allowed); sorted."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in path.rglob("*") if _is_image(p)]
    else:
        found = [
            Path(p) for p in glob.glob(str(spec), recursive=True) if _is_image(Path(p))
        ]
    if not found:
        what = "folder" if path.is_dir() else "pattern"
        msg = f"no images matched --data '{spec}' ({what}; extensions {', '.join(IMG_EXTENSIONS)})"
        raise FileNotFoundError(msg)
    return sorted(found)


def load_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` float RGB image in ``[0, 1]``; an unreadable file raises naming it."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        msg = f"cannot read image '{path}': {exc}"
        raise OSError(msg) from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.no_grad()
def _score_batch(model: MoLEFlow, images: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Route and score raw images (any sizes): per image its expert index, raw and normalised score
    and normalised ``(H, W)`` map (``None`` for an unknown product)."""
    torch_model = model.model
    inputs = torch.cat(
        [model.prepare_images(image[None]) for image in images]
    )  # resized one by one
    features = torch_model.extract_features(inputs)
    with torch_model.raw_scores():  # the model's own routed forward, raw; normalised below per expert
        raw = torch_model.predict_features(features)
    route = raw.pred_task
    out: list[dict[str, Any]] = [
        {"task": UNKNOWN, "raw": None, "score": None, "map": None} for _ in images
    ]
    for index in route.unique().tolist():
        if index == UNKNOWN:
            continue
        key = torch_model.task_keys[index]
        rows = (route == index).nonzero(as_tuple=True)[0]
        fitted = torch_model.thresholds.fitted(key)
        score, amap = (
            torch_model.thresholds.normalize(key, raw.pred_score[rows], raw.anomaly_map[rows])
            if fitted
            else (None, None)
        )
        for j, row in enumerate(rows.tolist()):
            out[row] = {
                "task": index,
                "raw": float(raw.pred_score[row]),
                "score": float(score[j]) if fitted else None,
                "map": amap[j, 0].cpu() if fitted else None,
            }
    return out


def _label(score: float | None, task: int) -> str:
    if task == UNKNOWN:
        return UNKNOWN_PRODUCT
    if score is None:
        return ""
    return (
        "anomalous" if score > 0.5 else "normal"
    )  # anomalib's post-processor: above the threshold


def predict_images(
    model: MoLEFlow,
    paths: Sequence[Path],
    output_dir: str | Path | None = None,
    batch_size: int = 32,
    overlays: bool = True,
    progress: bool = True,
) -> list[PredictionRow]:
    """Rows of ``paths`` in batches of ``batch_size``; with ``output_dir`` and ``overlays``, a heatmap
    overlay per image is written under ``output_dir/overlays/`` (folders as below the images' common folder)."""
    if batch_size < 1:
        msg = f"--batch-size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    model.eval()
    torch_model = model.model
    thresholds = {
        key: torch_model.thresholds.values(key)["image_threshold"]
        if torch_model.thresholds.fitted(key)
        else None
        for key in torch_model.task_keys
    }
    common = Path(_common_folder(paths))
    rows: list[PredictionRow] = []
    starts = range(0, len(paths), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
        chunk = list(paths[start : start + batch_size])
        images = [load_image(path) for path in chunk]
        for path, image, scored in zip(
            chunk, images, _score_batch(model, images), strict=True
        ):
            task = scored["task"]
            known = task != UNKNOWN
            key = torch_model.task_keys[task] if known else None
            row = PredictionRow(
                path=str(path),
                product=torch_model.task_names[task] if known else UNKNOWN_PRODUCT,
                score_raw=scored["raw"],
                score=scored["score"],
                threshold_raw=thresholds[key] if known else None,
                threshold=0.5 if known and thresholds[key] is not None else None,
                label=_label(scored["score"], task),
            )
            if overlays and output_dir is not None:
                target = (
                    Path(output_dir)
                    / "overlays"
                    / path.resolve().relative_to(common).with_suffix(".png")
                )
                write_overlay(path, image, scored["map"], row, target)
                row.overlay = str(target)
            rows.append(row)
    return rows


def _common_folder(paths: Sequence[Path]) -> str:
    folders = [str(Path(p).resolve().parent) for p in paths]
    return os.path.commonpath(folders) if folders else "."


def write_overlay(
    path: Path,
    image: torch.Tensor,
    anomaly_map: torch.Tensor | None,
    row: PredictionRow,
    target: Path,
) -> None:
    """The image beside its heatmap overlay and predicted mask (anomalib's ``ImageVisualizer``), with
    the product, score and label written in."""
    from anomalib.data import ImageItem
    from anomalib.visualization import ImageVisualizer
    from anomalib.visualization.image.functional import add_text_to_image

    fields: dict[str, Any] = {"image": image, "image_path": str(path.resolve())}
    if anomaly_map is not None:
        fields |= {"anomaly_map": anomaly_map, "pred_mask": anomaly_map > 0.5}
    visualizer = ImageVisualizer(
        fields=["image"],
        overlay_fields=[("image", ["anomaly_map", "pred_mask"])],
        text_config={"size": TEXT_SIZE},
    )
    picture = visualizer.visualize(ImageItem(**fields))
    if row.score is not None:
        text = f"{row.product}: score {row.score:.3f} (raw {row.score_raw:.4g}) {row.label}"
    else:
        text = f"{row.product}: {row.label or 'no threshold'}"
    picture = add_text_to_image(
        picture, text, size=TEXT_SIZE, position=(10, picture.height - TEXT_SIZE - 14)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(target, "wb") as handle:
        picture.save(handle, format="PNG")


def write_rows(
    rows: Sequence[PredictionRow], output_dir: str | Path, meta: dict[str, Any]
) -> dict[str, Path]:
    """``predictions.csv`` and ``predictions.json`` (``meta`` plus the rows) in ``output_dir``, atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    paths = {
        "csv": output_dir / "predictions.csv",
        "json": output_dir / "predictions.json",
    }
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_json(paths["json"], {**meta, "rows": [asdict(row) for row in rows]})
    return paths
