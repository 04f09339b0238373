"""Tune MoLE-Flow: one continual run with config overrides, evaluated and written as a results file.

    python benchmarks/tune.py --set flow.context_kernel=3 --set loss.tail_top_ratio=0.05
    python benchmarks/tune.py --categories bottle --epochs 16 --set scoring.global_score_weight=0
    python benchmarks/tune.py --synthetic --categories red_stripes blue_checker --image-px 64 \\
        --epochs 1 --set features.image_size=64

Trains through the package's own code: a :class:`ContinualRunner` over a :class:`TaskStream` of
MVTec AD categories (``--root``) or of generated synthetic products (``--synthetic``), exactly as
``python -m anomalib_moleflow continual`` does, then evaluates every task routed (task id hidden)
and oracle. The model configuration is that of ``--config`` (a continual YAML, default
``anomalib_moleflow/configs/continual/mvtec_real.yaml``; its ``model.config``, epochs, batch sizes and seed) with each
``--set <group>.<field>=<value>`` applied on top; the learning rate is ``optim.lr`` of that
configuration, so only the config file or an explicit ``--set optim.lr=...`` changes it. The
optimiser's actual learning rate of every task is read back during training and recorded.

Writes ``<output-dir>/<name>.{json,md}`` (with the command) and refreshes ``<output-dir>/index.md``,
one row per results file there.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from reporting import (
    continual_table,
    finish_meta,
    header_line,
    markdown_table,
    run_meta,
    write_json,
)

from anomalib_moleflow.continual import (
    ContinualRunner,
    RunOptions,
    TaskStream,
    TrainerOptions,
)
from anomalib_moleflow.data.synthetic import PRODUCTS, make_stream
from anomalib_moleflow.models.moleflow import MoLEFlowConfig

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE.parent / "anomalib_moleflow" / "configs" / "continual" / "mvtec_real.yaml"
RESULTS = HERE / "results" / "tuning"
BENCHMARK = "tune"
"""The ``benchmark`` field of every results file this script writes (``index.md`` lists those)."""


class LearningRateProbe(Callback):
    """Records the learning rate each task's optimiser was built with (its schedule's base value)."""

    def __init__(self) -> None:
        self.learning_rates: list[float] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read the first parameter group of the task's optimiser."""
        del pl_module
        group = trainer.optimizers[0].param_groups[0]
        self.learning_rates.append(float(group.get("initial_lr", group["lr"])))


# ----------------------------------------------------------------------------- configuration
def parse_override(text: str) -> tuple[str, Any]:
    """``"group.field=value"`` -> ``("group.field", value)``; the value is read as JSON
    (numbers, ``true``, ``null``, ``[2, 3]``), else kept as a string (``whitening``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        msg = f"--set takes <group>.<field>=<value>, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def read_continual_config(path: Path) -> dict[str, Any]:
    """The ``model``, ``data``, ``trainer`` and ``run`` sections of a continual YAML (missing: empty)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {section: data.get(section) or {} for section in ("model", "data", "trainer", "run")}


def resolve_config(base: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> MoLEFlowConfig:
    """The base file's ``model.config`` with the ``--set`` overrides applied in order."""
    return MoLEFlowConfig.from_dict(base["model"].get("config") or {}).updated(dict(overrides))


def default_name(overrides: Sequence[tuple[str, Any]]) -> str:
    """A file stem from the overrides (``flow.context_kernel=3__loss.tail_weight=0.5``), ``defaults`` without."""
    if not overrides:
        return "defaults"
    text = "__".join(f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="continual YAML: model.config, epochs, batches")
    p.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[], metavar="GROUP.FIELD=VALUE",
                   help="override one MoLEFlowConfig field (repeatable), e.g. --set flow.n_coupling_blocks=6")
    p.add_argument("--categories", nargs="+", default=None,
                   help="tasks in training order (default: the config's data.tasks; with --synthetic the first two products)")
    p.add_argument("--root", default=None, help="folder holding the MVTec AD categories (default: the config's data.root)")
    p.add_argument("--synthetic", action="store_true", help=f"generate synthetic products instead: {', '.join(PRODUCTS)}")
    p.add_argument("--train-images", type=int, default=16, help="--synthetic: normal training images per product")
    p.add_argument("--test-images", type=int, default=8, help="--synthetic: test images per product (half defective)")
    p.add_argument("--image-px", type=int, default=256, help="--synthetic: side of the generated images")
    p.add_argument("--epochs", type=int, default=None, help="epochs of task 0 (default: the config's trainer.max_epochs)")
    p.add_argument("--later-epochs", type=int, default=None, help="epochs of later tasks (default: trainer.later_task_epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="train and eval batch size (default: the config's)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the config's run.seed)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--name", default=None, help="results file stem (default: from the overrides)")
    p.add_argument("--output-dir", type=Path, default=RESULTS, help="where <name>.{json,md} and index.md go")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data and the run here (default: a temp folder)")
    return p


# ----------------------------------------------------------------------------- the run
def _stream(args: argparse.Namespace, base: dict[str, Any], work: Path) -> TaskStream:
    """The task stream: the config's (or given) MVTec categories, or generated products under ``work``."""
    data = base["data"]
    if args.synthetic:
        names = args.categories or list(PRODUCTS)[:2]
        n_defect = max(1, args.test_images // 2)
        root = make_stream(work / "data", names, n_train=args.train_images, n_good=max(1, args.test_images - n_defect),
                           n_defect=n_defect, size=args.image_px)  # fmt: skip
    else:
        names, root = args.categories or data.get("tasks") or ["bottle", "transistor"], args.root or data.get("root")
    batch = args.batch_size
    return TaskStream(
        names, root=str(root), train_batch_size=batch or data.get("train_batch_size", 16),
        eval_batch_size=batch or data.get("eval_batch_size", 16),
        num_workers=args.num_workers if args.num_workers is not None else data.get("num_workers", 2),
        seed=data.get("seed"),
    )  # fmt: skip


def _trainer(args: argparse.Namespace, base: dict[str, Any]) -> TrainerOptions:
    trainer = base["trainer"]
    epochs = args.epochs if args.epochs is not None else trainer.get("max_epochs", TrainerOptions.max_epochs)
    later = args.later_epochs if args.later_epochs is not None else trainer.get("later_task_epochs")
    return TrainerOptions(max_epochs=epochs, later_task_epochs=later)


def run(args: argparse.Namespace, base: dict[str, Any], config: MoLEFlowConfig, work: Path) -> dict[str, Any]:
    """Train and evaluate the stream in ``work``; the run's settings, results and learning rates."""
    stream, trainer = _stream(args, base, work), _trainer(args, base)
    seed = args.seed if args.seed is not None else base["run"].get("seed", 0)
    probe = LearningRateProbe()
    run_options = RunOptions(output_dir=str(work / "run"), seed=seed, extra_callbacks=[probe])
    results = ContinualRunner(config, stream, trainer, run_options).run()
    return {
        "settings": {
            "tasks": stream.names, "data_root": stream.root, "synthetic": args.synthetic,
            "epochs": trainer.max_epochs, "later_epochs": trainer.later_task_epochs,
            "train_batch_size": stream.train_batch_size, "eval_batch_size": stream.eval_batch_size,
            "seed": seed, "threads": args.threads, "base_config": str(args.config),
        },
        "optimizer_lr_per_task": probe.learning_rates,
        "results": results.to_dict(),
    }  # fmt: skip


# ----------------------------------------------------------------------------- results files
def markdown(data: dict[str, Any]) -> str:
    """``<name>.md``: the command, what was changed, and the continual results table."""
    s, overrides = data["settings"], data["overrides"]
    changed = ", ".join(f"`{key}={value}`" for key, value in overrides.items()) or "none (the base config)"
    lines = [
        f"# MoLE-Flow tuning run `{data['name']}`",
        "",
        header_line(data["meta"]),
        "",
        f"Overrides: {changed}; base `{s['base_config']}`. Learning rate {data['lr']:g} "
        f"(optimiser per task: {', '.join(f'{lr:g}' for lr in data['optimizer_lr_per_task'])}). "
        f"Tasks: {' -> '.join(s['tasks'])} ({'synthetic products' if s['synthetic'] else 'MVTec AD'}), "
        f"{s['epochs']} epoch(s) for task 0, {s['later_epochs'] or s['epochs']} for later tasks, batch "
        f"{s['train_batch_size']}, seed {s['seed']}. Routed = task id hidden.",
        "",
        *continual_table(data["results"]),
    ]
    return "\n".join(lines) + "\n"


def _index_row(data: dict[str, Any]) -> tuple[str, ...]:
    mean, s = data["results"]["mean"], data["settings"]
    value = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    overrides = ", ".join(f"{k}={v}" for k, v in data["overrides"].items()) or "-"
    return (f"[{data['name']}]({data['name']}.md)", data["meta"]["date"], " -> ".join(s["tasks"]), overrides,
            f"{data['lr']:g}", value(mean.get("image_AUROC")), value(mean.get("pixel_AUROC")),
            value(mean.get("routing_accuracy")))  # fmt: skip


def write_index(output_dir: Path) -> Path:
    """``index.md``: one row per tuning results file in ``output_dir``, by name."""
    runs = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*.json"))]
    runs = [r for r in runs if isinstance(r, dict) and r.get("benchmark") == BENCHMARK]
    header = ("run", "date", "tasks", "overrides", "lr", "mean image AUROC", "mean pixel AUROC", "routing acc.")
    lines = ["# MoLE-Flow tuning runs", "", "Written by `benchmarks/tune.py`; means over the tasks, routed.", "",
             *markdown_table(header, [_index_row(r) for r in runs])]  # fmt: skip
    path = output_dir / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one tuning experiment and write its results; returns what ``<name>.json`` holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    base = read_continual_config(args.config)
    try:
        config = resolve_config(base, args.overrides)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    if args.work_dir is not None:
        outcome = run(args, base, config, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="moleflow_tune_") as tmp:
            outcome = run(args, base, config, Path(tmp))
    name = args.name or default_name(args.overrides)
    data = {
        "benchmark": BENCHMARK, "name": name, "meta": finish_meta(run_meta("tune.py", argv), start),
        "overrides": dict(args.overrides), "lr": config.optim.lr, **outcome, "config": config.to_dict(),
    }  # fmt: skip
    paths = [write_json(args.output_dir / f"{name}.json", data), args.output_dir / f"{name}.md"]
    paths[1].write_text(markdown(data))
    paths.append(write_index(args.output_dir))
    print(markdown(data))
    for path in paths:
        print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
