"""``anomalib-moleflow`` command line (jsonargparse, anomalib-style configs).

    anomalib-moleflow continual --config configs/continual/mvtec_real.yaml [--data.root DIR] [--resume true]
    python -m anomalib_moleflow continual ...   # the same
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from anomalib_moleflow.continual.runner import (
    ContinualRunner,
    RunOptions,
    TrainerOptions,
)
from anomalib_moleflow.continual.task_stream import TaskStream
from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig


def continual_parser() -> ArgumentParser:
    """Parser of the ``continual`` subcommand."""
    parser = ArgumentParser(description="Train MoLE-Flow over a stream of tasks and evaluate after each.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (see configs/continual/)")
    parser.add_dataclass_arguments(MoLEFlowConfig, "model.config", default=MoLEFlowConfig())
    parser.add_class_arguments(TaskStream, "data")
    parser.add_dataclass_arguments(TrainerOptions, "trainer", default=TrainerOptions())
    parser.add_dataclass_arguments(RunOptions, "run", default=RunOptions(), skip={"extra_callbacks"})
    parser.add_argument("--resume", type=bool, default=False, help="continue after the last finished task")
    return parser


def build_parser() -> ArgumentParser:
    """Top-level parser with its subcommands."""
    parser = ArgumentParser(prog="anomalib-moleflow", description="MoLE-Flow for anomalib.")
    subcommands = parser.add_subcommands(required=True)
    subcommands.add_subcommand("continual", continual_parser(), help="continual training and evaluation")
    return parser


def format_summary(summary: dict) -> str:
    """Final per-task metrics (routed, task id hidden), mean and forgetting as a text table."""

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    keys = ("image_AUROC", "pixel_AUROC", "pixel_AP", "routing_accuracy")
    rows = [f"{'task':<16}" + "".join(f"{k:>18}" for k in keys)]
    for name in summary["tasks"]:
        final = summary["final"].get(name, {})
        rows.append(f"{name:<16}" + "".join(f"{cell(final.get(k)):>18}" for k in keys))
    rows.append(f"{'mean':<16}" + "".join(f"{cell(summary['mean'].get(k)):>18}" for k in keys))
    forgetting = summary["forgetting"]
    rows.append(f"{'forgetting':<16}" + "".join(f"{cell(forgetting.get(k)):>18}" for k in keys[:3]))
    timing = summary["timing"]
    rows.append(f"train seconds per task: {json.dumps(timing['train_seconds'])}; "
                f"inference {cell(timing['inference_ms_per_image'])} ms/image")
    return "\n".join(rows)


def run_continual(cfg: object) -> int:
    """Build the runner from a parsed ``continual`` namespace and run it."""
    init = continual_parser().instantiate_classes(cfg)
    model_config = init.model.config
    stream = init.data
    trainer_opts = init.trainer
    run_opts = init.run
    runner = ContinualRunner(model_config, stream, trainer=trainer_opts, run=run_opts)
    results = runner.run(resume=cfg.resume)
    summary = results.to_dict()
    print(format_summary(summary))
    print(f"results written to {runner.output_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anomalib-moleflow`` and ``python -m anomalib_moleflow``."""
    parser = build_parser()
    cfg = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    if cfg.subcommand == "continual":
        try:
            return run_continual(cfg.continual)
        except (FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
            # bad data paths, an occupied run folder, a checkpoint of another run (CheckpointError
            # is a ValueError), an unreadable image: the message says what and where
            print(f"anomalib-moleflow continual: error: {exc}", file=sys.stderr)
            return 1
    parser.error(f"unknown subcommand {cfg.subcommand!r}")
    return 2
