"""``anomalib-moleflow`` command line (jsonargparse, anomalib-style configs).

    anomalib-moleflow continual --config configs/continual/mvtec_real.yaml [--data.root DIR] [--resume true]
    python -m anomalib_moleflow continual ...   # the same
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from anomalib_moleflow.continual.interruption import RunInterrupted
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
    run_opts.resume_force = run_opts.resume_force or bool(cfg.resume_force)
    runner = ContinualRunner(model_config, stream, trainer=trainer_opts, run=run_opts)
    results = runner.run(resume=cfg.resume)
    summary = results.to_dict()
    print(format_summary(summary))
    print(f"results written to {runner.output_dir}")
    return 0


def error_line(exc: BaseException) -> str:
    """The one line a failure is reported with: its message, with the errno and the file of an OS error."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" '{exc.filename}'" if exc.filename else ""
        text = f"{exc.strerror} ({name}) while writing or reading{where}"
        if exc.errno == errno.ENOSPC:
            text += "; the files written before are intact (every write is atomic): free space and resume with --resume true"
        return text
    return str(exc).replace("\n", " | ")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anomalib-moleflow`` and ``python -m anomalib_moleflow``.

    Exit codes: 0 the run completed; 1 it failed (the message on stderr says what and where);
    2 bad command-line arguments; 128 + signal number when a signal stopped it (130 SIGINT,
    143 SIGTERM) after saving what finished.
    """
    parser = build_parser()
    args = list(argv) if argv is not None else sys.argv[1:]
    if not {"-h", "--help", "--print_config"} & set(args):
        parser.exit_on_error = False
        for action in parser._subcommands_action._name_parser_map.values():  # noqa: SLF001
            action.exit_on_error = False
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as exc:  # one line naming the key or value, instead of usage and a traceback
        print(f"anomalib-moleflow: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if cfg.subcommand == "continual":
        try:
            return run_continual(cfg.continual)
        except RunInterrupted as exc:
            print(f"anomalib-moleflow continual: {exc}", file=sys.stderr)
            return exc.exit_code
        except (OSError, ValueError, RuntimeError) as exc:
            # bad data or settings, an occupied run folder, a checkpoint of another run or a changed one
            # (CheckpointError is a ValueError), a full disk, training that diverged: what and where
            print(f"anomalib-moleflow continual: error: {error_line(exc)}", file=sys.stderr)
            return 1
    parser.error(f"unknown subcommand {cfg.subcommand!r}")
    return 2
