"""``anomalib-moleflow continual``: train MoLE-Flow over a stream of tasks and evaluate after each.

    anomalib-moleflow continual --config mvtec_real [--data.root DIR] [--resume true]
    anomalib-moleflow continual --config mvtec_real --run.only_task 2 --run.base RUN0 --run.output_dir part_2

``--resume true`` with a task list that extends the run's adds the new tasks; ``--run.only_task``
trains one task's expert from a base run into a part file (:mod:`anomalib_moleflow.continual.expert_parts`).
"""

from __future__ import annotations

import json

from jsonargparse import ArgumentParser

from anomalib_moleflow.cli.configs import ConfigFileOrName
from anomalib_moleflow.continual.expert_parts import train_expert_part
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
    parser.add_argument(
        "--config", action=ConfigFileOrName,
        help="YAML file, or the name of a shipped config (`anomalib-moleflow configs` lists them)",
    )  # fmt: skip
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
    """Final per-task metrics (routed, task id hidden), mean and forgetting, then each task's
    thresholds (raw and normalised) and the images that fitted them, as a text table."""

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    keys = ("image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1", "routing_accuracy")
    rows = [f"{'task':<16}" + "".join(f"{k:>18}" for k in keys)]
    for name in summary["tasks"]:
        final = summary["final"].get(name, {})
        rows.append(f"{name:<16}" + "".join(f"{cell(final.get(k)):>18}" for k in keys))
    rows.append(f"{'mean':<16}" + "".join(f"{cell(summary['mean'].get(k)):>18}" for k in keys))
    forgetting = summary["forgetting"]
    rows.append(f"{'forgetting':<16}" + "".join(f"{cell(forgetting.get(k)):>18}" for k in keys[:4]))
    timing = summary["timing"]
    rows.append(f"train seconds per task: {json.dumps(timing['train_seconds'])}; "
                f"inference {cell(timing['inference_ms_per_image'])} ms/image")
    thresholds = summary.get("thresholds", {})
    if thresholds:
        rows.append(f"{'threshold':<16}{'image raw (normalised)':>26}{'pixel raw (normalised)':>26}")
        for name, values in thresholds.items():
            image, pixel = (f"{cell(values[f'{k}_threshold'])} ({cell(values[f'{k}_threshold_normalized'])})"
                            for k in ("image", "pixel"))
            rows.append(f"{name:<16}{image:>26}{pixel if values['pixel_threshold'] is not None else '-':>26}")
        for fitted_on in dict.fromkeys(values["fitted_on"] for values in thresholds.values()):
            names = [name for name, values in thresholds.items() if values["fitted_on"] == fitted_on]
            rows.append(f"thresholds of {', '.join(names)} fitted on {fitted_on}")
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
    if run_opts.only_task is not None or run_opts.base is not None:  # one expert, trained apart
        path = train_expert_part(runner, resume=cfg.resume)
        print(f"expert {run_opts.only_task} '{stream.names[run_opts.only_task]}' written to {path}")
        return 0
    results = runner.run(resume=cfg.resume)
    summary = results.to_dict()
    print(format_summary(summary))
    print(f"results written to {runner.output_dir}")
    return 0
