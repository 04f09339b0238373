"""``anomalib-moleflow predict``: score images with a continual model, routed among all its products.

    anomalib-moleflow predict --model results/continual/mvtec_real --data parts/ [--output DIR]
        [--batch-size 32] [--overlays false] [--unknown-threshold 1.5]

Writes ``predictions.csv`` and ``predictions.json`` (one row per image: path, product, raw and
normalised score, the product's threshold, label) and ``overlays/`` into ``--output`` (default
``<run>/predictions`` for a run, else ``./predictions``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jsonargparse import ArgumentParser

from anomalib_moleflow.continual.evaluation import task_thresholds
from anomalib_moleflow.continual.prediction import (
    find_images,
    load_model,
    predict_images,
    write_rows,
)

HELP = "score images with a continual model: product, score and label per image"


def parser() -> ArgumentParser:
    """The subcommand's parser."""
    parser = ArgumentParser(
        description="Score images with a continual MoLE-Flow model, routed among its products."
    )
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="run folder (its last task checkpoint) or a task checkpoint",
    )
    parser.add_argument(
        "--data",
        type=str,
        required=True,
        help="an image, a folder (searched recursively) or a glob pattern",
    )
    parser.add_argument(
        "--output",
        type=str | None,
        default=None,
        help="output folder (default <run>/predictions or ./predictions)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per batch (products may mix)"
    )
    parser.add_argument(
        "--overlays",
        type=bool,
        default=True,
        help="write heatmap overlays (false: skip them)",
    )
    parser.add_argument(
        "--unknown-threshold", type=float | None, default=None,
        help="label images farther than this multiple of every product's calibration distance 'unknown'",
    )  # fmt: skip
    parser.add_argument(
        "--progress", type=bool, default=True, help="show a progress bar"
    )
    return parser


def default_output(model_path: Path, checkpoint: Path) -> Path:
    """``<run>/predictions`` for a run folder or a checkpoint inside ``<run>/checkpoints/``, else ``./predictions``."""
    if model_path.is_dir():
        return model_path / "predictions"
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "predictions"
    return Path("predictions")


def run(cfg: object) -> int:
    """Load the model, score the images, write the rows (and overlays); print a summary."""
    model, checkpoint = load_model(cfg.model, unknown_threshold=cfg.unknown_threshold)
    paths = find_images(cfg.data)
    output = (
        Path(cfg.output) if cfg.output else default_output(Path(cfg.model), checkpoint)
    )
    rows = predict_images(
        model,
        paths,
        output,
        batch_size=cfg.batch_size,
        overlays=cfg.overlays,
        progress=cfg.progress,
    )
    torch_model = model.model
    meta = {
        "model": str(checkpoint),
        "data": cfg.data,
        "products": list(torch_model.task_names),
        "thresholds": {
            name: {k: v for k, v in values.items() if k.startswith("image")}
            for index, name in enumerate(torch_model.task_names)
            if (values := task_thresholds(model, index, pixel_fitted=False)) is not None
        },
        "unknown_threshold": cfg.unknown_threshold,
    }
    written = write_rows(rows, output, meta)
    counts = Counter((row.product, row.label) for row in rows)
    print(
        f"{len(rows)} image(s): "
        + ", ".join(
            f"{product} {label or '-'} {n}"
            for (product, label), n in sorted(counts.items())
        )
    )
    print(
        f"predictions written to {written['csv']} and {written['json']}"
        + (f", overlays in {output / 'overlays'}" if cfg.overlays else "")
    )
    return 0
