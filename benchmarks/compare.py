"""MoLE-Flow against anomalib's PatchCore and FastFlow: quality, forgetting, speed, size, memory.

    python benchmarks/compare.py --root ../shared/data/mvtec_ad

Runs, one model per subprocess (``--worker NAME``, peak memory per model), on the same data,
backbone (``tf_efficientnet_lite0`` offline weights, stride-8/16 stages) and input size:

* ``moleflow``: the continual CLI (``python -m anomalib_moleflow continual --config
  mvtec_real ...``), then its final checkpoint for the costs;
* ``patchcore`` / ``fastflow``: anomalib's models, one per task (task id known: upper bound);
* ``fastflow_seq``: one FastFlow fine-tuned task after task (forgetting);
* ``patchcore_joint``: one PatchCore memory bank grown task after task by each task's coreset
  (task-free; the per-task worker's coresets are reused, so no coreset is computed twice);
* ``backbone``: the frozen backbone alone (the floor every model shares).

Writes ``<output>/compare.{json,md}`` and ``compare_{quality,speed,cost}.png``; scratch files
(MoLE-Flow run, per-worker JSON) go to ``--work-dir``. Extra arguments for the MoLE-Flow command:
``--moleflow-args="--trainer.max_epochs 4"``. FastFlow trains MoLE-Flow's epochs per task
(``trainer.max_epochs`` for the first task, ``trainer.later_task_epochs`` after) unless ``--epochs``.

Run time on 2 CPU cores at 1 thread: MoLE-Flow ~15 min; FastFlow per task + sequential ~2x its
epochs; PatchCore is dominated by anomalib's k-center-greedy coreset (~0.17 s per selected patch
row over bottle's 214k patches): at anomalib's default ratio 0.1 about 1 h per task;
``--coreset-ratio 0.01`` cuts that tenfold.
All quality metrics use MoLE-Flow's ``evaluate_task`` helpers; baseline scores are min-max scaled
per test set first (rank-preserving) so that torchmetrics does not squash them with a sigmoid.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from compare_lib.markdown import markdown
from compare_lib.names import FIGURE_KEYS, LABELS, MODELS
from compare_lib.plots import plots
from compare_lib.targets import ratios, targets
from reporting import finish_meta, run_meta, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DEFAULT_CONFIG = REPO / "anomalib_moleflow" / "configs" / "continual" / "mvtec_real.yaml"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="../shared/data/mvtec_ad", help="folder holding the MVTec AD categories")
    p.add_argument("--categories", nargs="+", default=["bottle", "transistor"], help="tasks in training order")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="MoLE-Flow continual config")
    p.add_argument("--moleflow-args", default="", help="extra arguments for the MoLE-Flow continual command (one string)")
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="FastFlow epochs: one value for every task, or one per task (default: MoLE-Flow's schedule)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="subset of models")
    p.add_argument("--output", default=str(HERE / "results"), help="where compare.{json,md,png} go")
    p.add_argument("--work-dir", default="results/compare", help="scratch: MoLE-Flow run, worker JSON files")
    p.add_argument("--timing-repeats", type=int, default=10, help="timed runs (median) per measurement")
    p.add_argument("--timing-warmup", type=int, default=3, help="untimed warm-up runs")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore coreset sampling ratio (anomalib: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep worker results already in --work-dir")
    p.add_argument("--in-process", action="store_true", help="run workers in this process (debugging, tests)")
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def make_spec(args: argparse.Namespace, work_dir: Path) -> Any:
    """Resolve the MoLE-Flow config (config file + overrides) and share its settings with every model."""
    from compare_lib.common import Spec

    from anomalib_moleflow.cli import continual_parser

    run_dir = work_dir / "moleflow_run"
    cli_args = ["--config", str(args.config), "--data.root", str(args.root),
                "--data.tasks", json.dumps(list(args.categories)), "--run.output_dir", str(run_dir),
                *shlex.split(args.moleflow_args)]
    cfg = continual_parser().parse_args(cli_args)
    features, data, trainer = cfg.model.config.features, cfg.data, cfg.trainer
    n = len(args.categories)
    if args.epochs is None:
        later = trainer.later_task_epochs if trainer.later_task_epochs is not None else trainer.max_epochs
        epochs = [trainer.max_epochs] + [later] * (n - 1)
    elif len(args.epochs) in (1, n):
        epochs = list(args.epochs) * (n if len(args.epochs) == 1 else 1)
    else:
        msg = f"--epochs takes 1 or {n} values, got {args.epochs}"
        raise SystemExit(msg)
    return Spec(
        root=str(args.root), tasks=list(args.categories), backbone=features.backbone,
        out_indices=list(features.layers), image_size=int(features.image_size), train_batch_size=data.train_batch_size,
        eval_batch_size=data.eval_batch_size, num_workers=data.num_workers, epochs=epochs,
        coreset_ratio=args.coreset_ratio, timing_repeats=args.timing_repeats, timing_warmup=args.timing_warmup,
        seed=args.seed, data_seed=data.seed, moleflow_cmd=["-m", "anomalib_moleflow", "continual", *cli_args],
        moleflow_dir=str(run_dir),
    )


def run_worker(name: str, spec_path: Path, result_path: Path) -> dict[str, Any]:
    """Measure one model (in this process) and write its JSON."""
    from compare_lib import baselines, moleflow
    from compare_lib.common import Spec

    os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar floods the log
    spec = Spec.load(spec_path)
    runners = {
        "moleflow": moleflow.run_moleflow,
        "backbone": moleflow.run_backbone,
        "patchcore": lambda s: baselines.run_per_task(s, "patchcore"),
        "fastflow": lambda s: baselines.run_per_task(s, "fastflow"),
        "fastflow_seq": baselines.run_fastflow_sequential,
        "patchcore_joint": baselines.run_patchcore_joint,
    }
    start = time.perf_counter()
    result = runners[name](spec)
    result["label"] = LABELS[name]
    result["worker_seconds"] = time.perf_counter() - start
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison (or one ``--worker``); returns the results dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker, Path(args.spec), Path(args.result))
    work_dir, out_dir = Path(args.work_dir), Path(args.output)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = make_spec(args, work_dir)
    spec_path = work_dir / "spec.json"
    spec.save(spec_path)
    models: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in [m for m in MODELS if m in args.models]:
        result_path = work_dir / f"worker_{name}.json"
        if args.reuse and result_path.is_file():
            models[name] = json.loads(result_path.read_text())
            continue
        result_path.unlink(missing_ok=True)
        if name == "moleflow" and Path(spec.moleflow_dir).exists():
            shutil.rmtree(spec.moleflow_dir)  # always a complete, fresh continual run
        print(f"[compare] {name}: {LABELS[name]}", flush=True)
        model_start = time.perf_counter()
        try:
            if args.in_process:
                run_worker(name, spec_path, result_path)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
                       "--spec", str(spec_path), "--result", str(result_path)]
                subprocess.run(cmd, check=True)
            models[name] = json.loads(result_path.read_text())
        except Exception as exc:  # noqa: BLE001 - report the others anyway
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"[compare] {name} done in {time.perf_counter() - model_start:.0f} s", flush=True)
    from compare_lib.baselines import layer_names

    meta = finish_meta(run_meta("compare.py", argv), run_start)
    meta.update({
        "tasks": spec.tasks, "backbone": spec.backbone, "out_indices": spec.out_indices,
        "layers": layer_names(spec.backbone, spec.out_indices), "image_size": spec.image_size,
        "fastflow_epochs": spec.epochs,
        "epochs_note": "MoLE-Flow's own schedule (trainer.max_epochs, then later_task_epochs)" if args.epochs is None
        else "set by --epochs",
        "coreset_ratio": spec.coreset_ratio, "timing_repeats": spec.timing_repeats,
        "timing_warmup": spec.timing_warmup, "moleflow_command": "python " + " ".join(shlex.quote(c) for c in spec.moleflow_cmd),
        "spec": json.loads(spec_path.read_text()), "errors": errors,
    })
    data: dict[str, Any] = {"meta": meta, "models": models, "figure_keys": list(FIGURE_KEYS)}
    data["ratios"] = ratios(models)
    data["targets"] = targets(models, data["ratios"])
    data["plots"] = plots(data, out_dir)
    write_json(out_dir / "compare.json", data)
    (out_dir / "compare.md").write_text(markdown(data))
    print(markdown(data))
    if errors:
        msg = f"[compare] failed: {errors}"
        raise SystemExit(msg)
    return data


if __name__ == "__main__":
    main()
