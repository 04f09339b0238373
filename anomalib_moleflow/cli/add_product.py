"""``anomalib-moleflow add-product``: a continual run learns more products.

    anomalib-moleflow add-product --model results/continual/mvtec_real --task cable [--task screw ...] [--data.root DIR]

The run's last checkpoint records its model configuration, task stream and settings; the new
products train after the run's tasks exactly as ``continual --resume true`` over the longer task
list does (earlier experts and their statistics stay bit-identical), and the run's checkpoints and
results grow in place. A task is an MVTec category name, or a task dict as in a config
(``--task '{name: part, kind: folder, root: ..., normal_dir: good}'``); ``--data.root`` is where the
new MVTec categories are (default: the run's data root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from anomalib_moleflow.cli.continual import format_summary
from anomalib_moleflow.continual.run_checkpoint import latest_checkpoint, load_run_checkpoint
from anomalib_moleflow.continual.runner import ContinualRunner, RunOptions, TrainerOptions
from anomalib_moleflow.continual.task_stream import TaskSpec, TaskStream
from anomalib_moleflow.io import CheckpointError
from anomalib_moleflow.models.moleflow.checkpoint_format import saved_settings

HELP = "teach a continual run more products"


def parser() -> ArgumentParser:
    """Parser of the ``add-product`` subcommand."""
    p = ArgumentParser(description="Teach a continual run more products (its earlier experts stay as they are).")
    p.add_argument("--model", type=str, required=True, help="the run folder (its checkpoints/ are extended)")
    p.add_argument("--task", action="append", required=True, help="a product to add (repeatable; a name, a [list] or a task dict)")
    p.add_argument("--data.root", type=str | None, default=None, help="folder of the new MVTec categories (default: the run's)")
    p.add_argument("--data.num_workers", type=int | None, default=None, help="DataLoader workers (default: the run's)")
    p.add_argument("--trainer.accelerator", type=str, default="cpu")
    p.add_argument("--trainer.devices", type=int, default=1)
    return p


def new_tasks(values: list[str], root: str | None) -> list[TaskSpec]:
    """The ``--task`` values as task specs (an MVTec name gets ``root`` when given)."""
    specs: list[TaskSpec] = []
    for value in values:
        parsed: Any = yaml.safe_load(value) if value.lstrip()[:1] in ("[", "{") else value
        for item in parsed if isinstance(parsed, list) else [parsed]:
            spec = TaskSpec.from_value(str(item) if isinstance(item, int | float) else item)
            if spec.kind == "mvtec" and spec.root is None and root is not None:
                spec.root = root
            specs.append(spec)
    return specs


def grown_runner(run_dir: str | Path, tasks: list[TaskSpec], **overrides: Any) -> ContinualRunner:  # noqa: ANN401
    """A runner that continues the run in ``run_dir`` over its recorded tasks plus ``tasks``.

    ``overrides``: ``num_workers``, ``accelerator``, ``devices`` (none of them changes results).
    """
    path = latest_checkpoint(run_dir)
    checkpoint, _ = load_run_checkpoint(path)
    if not isinstance(checkpoint.get("settings"), dict) or not isinstance(checkpoint.get("stream"), dict):
        msg = f"'{path}' records no task stream or settings (an older run); grow it with continual --resume true and its config"
        raise CheckpointError(msg)
    settings, recorded = checkpoint["settings"], dict(checkpoint["stream"])
    known = [TaskSpec.from_value(t).name for t in recorded["tasks"]]
    for spec in tasks:
        if spec.name in known:
            msg = f"task '{spec.name}' is already task {known.index(spec.name)} of the run '{run_dir}'"
            raise ValueError(msg)
    recorded["tasks"] = [*recorded["tasks"], *[spec.to_dict() for spec in tasks]]
    if overrides.get("num_workers") is not None:
        recorded["num_workers"] = overrides["num_workers"]
    trainer = TrainerOptions(
        **settings["trainer"], accelerator=overrides.get("accelerator", "cpu"), devices=overrides.get("devices", 1)
    )
    run = RunOptions(output_dir=str(run_dir), seed=settings["seed"], use_ogp=checkpoint.get("ogp") is not None)
    return ContinualRunner(saved_settings(checkpoint, path).config, TaskStream.from_dict(recorded), trainer=trainer, run=run)


def run(cfg: Any) -> int:  # noqa: ANN401 - a jsonargparse namespace
    """Add the products and print the run's summary."""
    tasks = new_tasks(list(cfg.task), cfg.data.root)
    runner = grown_runner(
        cfg.model,
        tasks,
        num_workers=cfg.data.num_workers,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
    )
    results = runner.run(resume=True)
    print(format_summary(results.to_dict()))
    print(f"added {[t.name for t in tasks]}; results written to {runner.output_dir}")
    return 0
