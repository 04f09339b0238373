"""``anomalib-moleflow continual``: train MoLE-Flow over a stream of tasks and evaluate after each.

    anomalib-moleflow continual --config configs/continual/mvtec_real.yaml [--data.root DIR] [--resume true]
"""

from __future__ import annotations

import json

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
    parser.add_argument(
        "--resume-force", type=bool, default=False,
        help="resume even if the seed, epochs, batch sizes or data settings changed (recorded in the results)",
    )  # fmt: skip
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


HELP = "continual training and evaluation"


def parser() -> ArgumentParser:
    """The subcommand's parser (see :func:`continual_parser`)."""
    return continual_parser()


def run(cfg: object) -> int:
    """Build the runner from a parsed ``continual`` namespace and run it."""
    init = continual_parser().instantiate_classes(cfg)
    model_config = init.model.config
    stream = init.data
    trainer_opts = init.trainer
    run_opts = init.run
    run_opts.resume_force = run_opts.resume_force or bool(cfg.resume_force)
    runner = ContinualRunner(model_config, stream, trainer=trainer_opts, run=run_opts)
    results = runner.run(resume=cfg.resume)
    summary = results.to_dict()
    print(format_summary(summary))
    print(f"results written to {runner.output_dir}")
    return 0
