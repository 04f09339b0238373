"""Every ablation preset (one per version of the design notes) on the real stream, in one table.

    python benchmarks/ablations.py                        # every preset, bottle then transistor (hours)
    python benchmarks/ablations.py --only v5,v7           # some of them
    python benchmarks/ablations.py --plan                 # no runs: the table with the notes' numbers, ours pending
    python benchmarks/ablations.py --data-root DIR --tasks a b --image-size 64 --epochs 1 -- --data.num_workers 0

Each preset (``anomalib_moleflow/configs/ablations/<name>.yaml``) runs as
``python -m anomalib_moleflow continual --config <stream config> --config <preset>`` in a subprocess,
in a fresh folder ``<output-dir>/<name>``; the stream config is ``continual/mvtec_real`` (bottle then
transistor, 16 + 32 epochs, task id hidden at test time). ``--data-root``, ``--tasks``,
``--image-size`` and ``--epochs`` (every task) override it; arguments after ``--`` go to each
continual command unchanged. From each run: final image AUROC, pixel AUROC, pixel AP and routing
accuracy per task, forgetting, train seconds per task (``continual_metrics.json``), and the
parameters each task trained and added (from the last checkpoint). Next to them, the numbers the
notes report for that version, with the notes' section; the notes ran other streams (leather ->
grid -> transistor, or all 15 MVTec AD classes) with a ViT backbone and their own code, so those
are context, not a comparison.

Writes ``<results-dir>/ablations.{json,md}`` (default ``benchmarks/results``) with the command, and
for the ``baseline_1_5`` / ``baseline_2_0`` runs ``ablations_context_<preset>.png``: their context
alpha or patch-wise gate per coupling block over the epochs (:mod:`ablation_context`). A
preset whose run fails is recorded as failed and the others still run; the exit code is then 1.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablation_context import context_plots
from reporting import finish_meta, header_line, markdown_table, run_meta, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PRESET_DIR = REPO / "anomalib_moleflow" / "configs" / "ablations"
STREAM_CONFIGS = (
    REPO / "anomalib_moleflow" / "configs" / "continual" / "mvtec_real.yaml",  # package data
    REPO / "configs" / "continual" / "mvtec_real.yaml",  # where it was before
)
REPRODUCIBLE_MKL = "AUTO,STRICT"
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "routing_accuracy")
NOTES_FILE = "../shared/spec/seed-update-notes.en.md"
CONTEXT_PRESETS = ("baseline_1_5", "baseline_2_0")
"""Presets whose context branch (alpha, gate) is plotted over the epochs."""

#: What the notes report for each version: (section of the notes, what they report). Copied from the
#: notes; their streams, backbone (a ViT) and code differ from this package's run.
NOTES_REPORTED: dict[str, list[tuple[str, str]]] = {
    "v1": [
        (
            "## v1 (baseline) - Initial Implementation, Results",
            "leather -> grid -> transistor: image AUROC 1.0000 / 0.8204 / 0.6654 "
            "(mean 0.8286), pixel AUROC 0.9481 / 0.9259 / 0.7144 (mean 0.8628), routing 100%",
        )
    ],
    "v2": [
        (
            "## v2 (baseline_v2) - LoRA Scaling & Task 0 LoRA, Results",
            "leather -> grid -> transistor: image AUROC 0.9997 / 0.9850 / 0.8075 "
            "(mean 0.9307), pixel AUROC 0.8900 / 0.9841 / 0.8973 (mean 0.9238), routing 100%",
        )
    ],
    "v3": [("## v3 (baseline_v3) - FiLM-style InputAdapter + Task 0 Self-Adaptation", "no results (expected improvements only)")],
    "v4": [("## v4 (baseline_v4) - CPCF + SC-LoRA, Expected Improvements", "no results (expected +5-10% image, +10-15% pixel AUROC)")],
    "v4_1": [
        (
            "## v4.1 - Fixed Context Extraction; ## v5, Motivation",
            "no results; v5's motivation: the cross-patch context approach failed (task bias)",
        )
    ],
    "v5": [("## v6 - Patch Self-Attention, Motivation", 'no numbers; "v5\'s Center Loss had a negligible effect"')],
    "v6": [("## v6 - Patch Self-Attention, v6 Result", 'no numbers; "Failed": the ViT features are already contextualised')],
    "v7": [("## v7 - Focal NLL Loss for Hard Sample Mining", "no results")],
    "baseline_1_5": [("## Baseline 1.5 → 2.0: Patch-wise Context Gate, Motivation", 'no results; "stuck at alpha ≈ initial value"')],
    "baseline_2_0": [("## Baseline 1.5 → 2.0: Patch-wise Context Gate", "no results")],
    "v3_1_whitening": [
        (
            "## V3 Experiment Results",
            "WhiteningAdapter only: experiment in progress (baseline V2 on leather -> grid -> transistor: mean image 0.8168, pixel 0.9166)",
        )
    ],
    "v3_2_ms_context": [("## V3 Experiment Results", "MS-Context only: experiment in progress (baseline V2: 0.8168 / 0.9166)")],
    "v3_3_dia": [
        (
            "## V3 Experiment Results",
            "DIA only, leather -> grid -> transistor: mean image 0.8217, pixel 0.9277 (baseline V2: 0.8168 / 0.9166)",
        )
    ],
    "v3_4_ogp": [("## V3 Experiment Results", "OGP only: mean image 0.8180, pixel 0.9161 (baseline V2: 0.8168 / 0.9166)")],
    "v3_5_hybrid_router": [("## V3-5: TwoStageHybridRouter", "no results")],
    "v3_dia_ogp": [
        ("## V3 Experiment Results", 'DIA + OGP ("best combination"): mean image 0.8226, pixel 0.9231 (baseline V2: 0.8168 / 0.9166)')
    ],
    "v3_all": [
        ("## V3 Experiment Results", "All V3 (conflict), leather -> grid -> transistor: mean image 0.4471, pixel 0.5527 (failed)"),
        (
            "## V4 Experiment Results (15 Classes)",
            "V3, 15 classes in the original order: mean image 0.7716, pixel 0.9009, "
            "routing 99.76%; leather (task 0) after task 14: image 0.07, pixel 0.66 (from ## V3 Problem Analysis)",
        ),
    ],
    "notes_v4": [
        (
            "## V4 Experiment Results (15 Classes)",
            "15 classes, original order: mean image 0.8636, pixel 0.9272, "
            "routing 99.76%; alphabetical: 0.8564 / 0.9245; task 0 after task 14: leather 1.00, bottle 0.999; "
            "grid image 0.8463 -> 0.8421 (-0.42%) from task 1 to task 14",
        )
    ],
    "notes_v4_1": [("## V4.1 - True Complete Separation", "no results (expected: 0% change of earlier tasks)")],
    "default": [("-", "not in the notes (the package's own design)")],
}


def stream_config() -> Path:
    """The real-stream config (package data, or the repository folder it came from)."""
    for path in STREAM_CONFIGS:
        if path.is_file():
            return path
    msg = f"no stream config at {', '.join(str(p) for p in STREAM_CONFIGS)}"
    raise FileNotFoundError(msg)


def presets(only: str | None) -> list[str]:
    """Preset names in the folder (in the notes' order, then any others), or those of ``--only``
    (comma-separated, in that order)."""
    order = {name: i for i, name in enumerate(NOTES_REPORTED)}
    found = sorted((p.stem for p in PRESET_DIR.glob("*.yaml")), key=lambda n: (order.get(n, len(order)), n))
    if not only:
        return found
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(found)}")
    return wanted


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated preset names (default: every preset)")
    parser.add_argument("--plan", action="store_true", help="run nothing: write the table with ours pending")
    parser.add_argument("--data-root", default="../shared/data/mvtec_ad", help="folder holding the task folders")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks in order (default: the stream config's)")
    parser.add_argument("--image-size", type=int, default=None, help="model.config.features.image_size")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every task (default: the config's 16 + 32)")
    parser.add_argument("--output-dir", default="results/ablations", help="one continual run folder per preset below this")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where ablations.{json,md} go")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other presets' rows of the existing ablations.json (same settings), replace those run now")
    parser.add_argument("extra", nargs="*", help="after --: more arguments for every continual command")
    return parser.parse_args(argv)


def continual_command(args: argparse.Namespace, name: str, out_dir: Path) -> list[str]:
    """The ``python -m anomalib_moleflow continual ...`` command of preset ``name``."""
    cmd = [
        sys.executable, "-m", "anomalib_moleflow", "continual",
        "--config", str(stream_config()), "--config", str(PRESET_DIR / f"{name}.yaml"),
        "--data.root", args.data_root, "--run.output_dir", str(out_dir),
    ]  # fmt: skip
    if args.tasks:
        cmd += ["--data.tasks", json.dumps(args.tasks)]
    if args.image_size is not None:
        cmd += ["--model.config.features.image_size", str(args.image_size)]
    if args.epochs is not None:
        cmd += ["--trainer.max_epochs", str(args.epochs), "--trainer.later_task_epochs", str(args.epochs)]
    return cmd + list(args.extra)


def parameters_per_task(run_dir: Path) -> dict[str, dict[str, int]]:
    """Per task: parameters trained while learning it and parameters its expert added (last checkpoint)."""
    from anomalib_moleflow.models.moleflow import MoLEFlow

    found = sorted((run_dir / "checkpoints").glob("task_*.ckpt"))
    model = MoLEFlow.from_checkpoint(found[-1]).model
    out = {}
    for key, name in zip(model.task_keys, model.task_names, strict=True):
        out[name] = {
            "trained": sum(p.numel() for p in model.trainable_parameters(key)),
            "added": sum(p.numel() for p in model.expert_parameters(key)),
        }
    return out


def run_preset(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """One preset's continual run (fresh folder) and what the table needs from it."""
    out_dir = Path(args.output_dir) / name
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark always measures a complete, fresh run
    cmd = continual_command(args, name, out_dir)
    env = dict(os.environ)
    env.setdefault("MKL_CBWR", REPRODUCIBLE_MKL)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    record: dict[str, Any] = {
        "preset": name,
        "continual_command": shlex.join(["python", *cmd[1:]]),
        "wall_seconds": time.perf_counter() - start,
        "exit_code": proc.returncode,
    }
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        record["error"] = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"preset {name}: continual run failed with exit code {proc.returncode}: {record['error']}", file=sys.stderr)
        return record
    metrics = json.loads((out_dir / "continual_metrics.json").read_text())
    record["tasks"] = metrics["tasks"]
    record["final"] = {t: {k: metrics["final"][t].get(k) for k in METRICS} for t in metrics["tasks"]}
    record["mean"] = {k: metrics["mean"].get(k) for k in METRICS}
    record["forgetting"] = {k: v for k, v in metrics["forgetting"].items() if not isinstance(v, dict)}
    record["train_seconds"] = metrics["timing"]["train_seconds"]
    record["parameters"] = parameters_per_task(out_dir)
    return record


# ----------------------------------------------------------------------------- markdown
def _num(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _row(entry: dict[str, Any]) -> list[str]:
    name = entry["preset"]
    notes = "; ".join(text if section == "-" else f"{text} ({section})" for section, text in NOTES_REPORTED.get(name, [("-", "-")]))
    if "final" not in entry:
        status = "pending" if entry.get("pending") else f"failed (exit {entry.get('exit_code')}: {entry.get('error', '')})"
        return [f"`{name}`", *[status] * 7, notes]
    tasks = entry["tasks"]

    def per_task(key: str, digits: int = 4) -> str:
        values = " / ".join(_num(entry["final"][t][key], digits) for t in tasks)
        return f"{values} ({_num(entry['mean'][key], digits)})"

    forgetting = " / ".join(_num(entry["forgetting"].get(k)) for k in ("image_AUROC", "pixel_AUROC", "pixel_AP"))
    train = " / ".join(_num(entry["train_seconds"].get(t), 0) for t in tasks)
    params = " / ".join(f"{_count(entry['parameters'][t]['trained'])} (+{_count(entry['parameters'][t]['added'])})" for t in tasks)
    return [f"`{name}`", per_task("image_AUROC"), per_task("pixel_AUROC"), per_task("pixel_AP"),
            per_task("routing_accuracy", 3), forgetting, train, params, notes]  # fmt: skip


def markdown(data: dict[str, Any]) -> str:
    """``ablations.md`` from what ``ablations.json`` holds."""
    meta = data["meta"]
    tasks = " -> ".join(data["settings"]["tasks"]) if data["settings"].get("tasks") else "the stream config's tasks"
    lines = ["# Ablation presets: every version of the design notes as a configuration", ""]
    pending = [e["preset"] for e in data["presets"] if e.get("pending")]
    if pending and not data.get("pending"):
        lines += [
            header_line(meta),
            "",
            f"**Pending rows** ({', '.join(f'`{p}`' for p in pending)}) have not been run yet: `--merge --only NAME,...` "
            "adds them to this table (every preset: hours on a 2-core CPU)."
            + ("".join(f" Rows run by earlier commands: {'; '.join(f'`{c}`' for c in data['earlier_commands'])}.")
               if data.get("earlier_commands") else ""),
        ]
    elif data.get("pending"):
        lines += [
            "**Real numbers pending**: this file was written with `--plan`, which runs nothing. Our columns fill in "
            "when the command below is run: hours in all on a 2-core CPU (`continual_real.py`, the `default` preset's "
            "run, takes about 10 minutes; the other presets' stride-8 grid has four times the patches):",
            "",
            "```bash",
            "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablations.py --data-root ../shared/data/mvtec_ad",
            "```",
            "",
            f"Written by: `{meta['command']}` ({meta['date']}).",
        ]
    else:
        lines.append(header_line(meta))
    lines += [
        "",
        f"Stream: {tasks}, task id hidden at test time (routed); stream config `{data['settings']['stream_config']}`, "
        f"overrides: {data['settings']['overrides'] or 'none'}. Presets: `anomalib_moleflow/configs/ablations/<name>.yaml` "
        "(each file's header says which notes section it follows, what it sets and which pieces of that version are "
        "not modules of this package). Cells list the tasks in order, then the mean in brackets; forgetting is "
        "best earlier minus final (image / pixel AUROC / pixel AP); parameters are those each task trained "
        "(task 0 includes the shared flow) and, after +, those its expert added.",
        "",
        f"The notes' numbers (last column, copied from `{NOTES_FILE}`, section in brackets) come from other streams "
        "(leather -> grid -> transistor, or all 15 MVTec AD classes), a ViT backbone instead of tf_efficientnet_lite0, "
        "and the notes' own code and epochs: they show what each version did there, not a target for this table.",
        "",
    ]
    header = ["preset", "image AUROC", "pixel AUROC", "pixel AP", "routing acc.", "forgetting", "train s per task",
              "parameters per task", "the notes report"]  # fmt: skip
    lines += markdown_table(header, [_row(entry) for entry in data["presets"]])
    if data.get("context_plots"):
        plots = ", ".join(f"`{preset}`: `{name}`" for preset, name in data["context_plots"].items())
        lines += ["", f"Context branch per coupling block over the epochs (Baseline 1.5's alpha, Baseline 2.0's gate): {plots}."]
    return "\n".join(lines) + "\n"


def merged(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (this run's presets) merged into the results at ``path``: the rows of presets run now
    replace theirs, the others stay, in the earlier order. Both must have the same settings."""
    if not path.is_file():
        raise SystemExit(f"--merge: no earlier results at {path}")
    earlier = json.loads(path.read_text())
    if earlier.get("settings") != data["settings"]:
        raise SystemExit(f"--merge: {path} was written with other settings ({earlier.get('settings')}), not {data['settings']}")
    new = {e["preset"]: e for e in data["presets"]}
    entries = [new.pop(e["preset"], e) for e in earlier["presets"]] + list(new.values())
    commands = list(earlier.get("earlier_commands", []))
    if not earlier.get("pending"):
        commands.append(earlier["meta"]["command"])
    return {
        **data,
        "pending": all(e.get("pending") for e in entries),
        "notes_reported": {**earlier.get("notes_reported", {}), **data["notes_reported"]},
        "presets": entries,
        "context_plots": {**earlier.get("context_plots", {}), **data["context_plots"]},
        "earlier_commands": commands,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the presets (or plan them), write ``ablations.{json,md}``; 0 when every run finished."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = presets(args.only)
    start = time.perf_counter()
    meta = run_meta("ablations.py", argv)
    overrides = {k: v for k, v in (("data.root", args.data_root), ("data.tasks", args.tasks),
                                   ("image_size", args.image_size), ("epochs", args.epochs)) if v is not None}  # fmt: skip
    if args.extra:
        overrides["extra"] = shlex.join(args.extra)
    import yaml

    stream_tasks = yaml.safe_load(stream_config().read_text())["data"]["tasks"]
    settings = {
        "stream_config": str(stream_config().relative_to(REPO)),
        "tasks": args.tasks or [t if isinstance(t, str) else t.get("name", str(t)) for t in stream_tasks],
        "overrides": ", ".join(f"{k}={v}" for k, v in overrides.items()),
    }
    if args.plan:
        entries = [
            {"preset": name, "pending": True,
             "continual_command": shlex.join(["python", *continual_command(args, name, Path(args.output_dir) / name)[1:]])}
            for name in names
        ]  # fmt: skip
    else:
        entries = [run_preset(args, name) for name in names]
    finished = {e["preset"]: Path(args.output_dir) / e["preset"] for e in entries if "final" in e and e["preset"] in CONTEXT_PRESETS}
    plots = context_plots(finished, Path(args.results_dir))
    meta = finish_meta(meta, start)
    data = {
        "benchmark": "ablations",
        "meta": meta,
        "settings": settings,
        "pending": args.plan,
        "notes_reported": {name: [{"section": sec, "reported": text} for sec, text in NOTES_REPORTED.get(name, [])] for name in names},
        "presets": entries,
        "context_plots": plots,
    }
    if args.merge:
        data = merged(Path(args.results_dir) / "ablations.json", data)
    write_results(Path(args.results_dir), "ablations", data, markdown)
    return 0 if all("error" not in e for e in entries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
