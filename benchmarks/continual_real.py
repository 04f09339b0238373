"""Continual MoLE-Flow on the real stream (bottle then transistor), task id hidden: the acceptance run.

    python benchmarks/continual_real.py --root ../shared/data/mvtec_ad
    python benchmarks/continual_real.py --seeds 0 1 2 --threads 1 2     # mean and spread of six runs

Runs ``python -m anomalib_moleflow continual --config mvtec_real``
in a subprocess with MKL's reproducible mode (``MKL_CBWR=AUTO,STRICT`` unless set; reruns then
repeat bit for bit at one torch thread), recording wall time and peak memory, then copies
its ``continual_metrics.json`` into ``<results-dir>/continual_real.json`` together with the
command, and writes a markdown table ``continual_real.md`` and the matrix plot.
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

from reporting import continual_table, finish_meta, header_line, markdown_table, run_meta, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE.parent / "anomalib_moleflow" / "configs" / "continual" / "mvtec_real.yaml"
REPRODUCIBLE_MKL = "AUTO,STRICT"
"""``MKL_CBWR`` for the run unless set: without it MKL's results may depend on memory alignment, and
two runs of the same command on one CPU were seen to differ (bottle pixel AUROC 0.9749 vs 0.9735)."""


SPREAD_KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "routing_accuracy")


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per task (and ``mean``) and metric: mean, sd, min and max over the runs' final metrics."""
    names = [*runs[0]["metrics"]["tasks"], "mean"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        out[name] = {}
        for key in SPREAD_KEYS:
            values = [
                (r["metrics"]["mean"] if name == "mean" else r["metrics"]["final"][name])[key] for r in runs
            ]
            values = [v for v in values if v is not None]
            if values:
                n = len(values)
                mu = sum(values) / n
                sd = (sum((v - mu) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
                out[name][key] = {"mean": mu, "sd": sd, "min": min(values), "max": max(values), "n": n}
    return out


def markdown(data: dict[str, Any]) -> str:
    """``continual_real.md`` from what ``continual_real.json`` holds."""
    lines = [
        "# Continual MoLE-Flow on the real stream (bottle -> transistor), task id hidden",
        "",
        header_line(data["meta"]),
        "",
        *continual_table(data["metrics"]),
    ]
    runs = data.get("runs", [])
    if len(runs) > 1:
        lines += ["", f"## {len(runs)} runs: seeds and torch thread counts", ""]
        lines += markdown_table(
            ["seed", "torch threads", *[f"{t} image / pixel AUROC" for t in runs[0]["metrics"]["tasks"]], "mean image / pixel AUROC"],
            [
                [r["seed"], r["threads"] or "-", *[
                    f"{r['metrics']['final'][t]['image_AUROC']:.4f} / {r['metrics']['final'][t]['pixel_AUROC']:.4f}"
                    for t in r["metrics"]["tasks"]
                ], f"{r['metrics']['mean']['image_AUROC']:.4f} / {r['metrics']['mean']['pixel_AUROC']:.4f}"]
                for r in runs
            ],
        )  # fmt: skip
        lines += ["", "Over all runs (mean +- sd, [min, max]):", ""]
        lines += markdown_table(
            ["task", *SPREAD_KEYS],
            [
                [name, *[
                    f"{v['mean']:.4f} +- {v['sd']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" if (v := row.get(k)) else "-"
                    for k in SPREAD_KEYS
                ]]
                for name, row in data["spread"].items()
            ],
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/mvtec_ad", help="folder holding the MVTec AD categories")
    parser.add_argument("--output-dir", default="results/continual/benchmark_real", help="the continual run's folder")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where continual_real.{json,md} go")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (run.seed)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="one run per torch thread count (OMP_NUM_THREADS)")
    parser.add_argument("extra", nargs="*", help="more arguments for the continual command")
    return parser.parse_args(argv)


def run_once(args: argparse.Namespace, out_dir: Path, seed: int | None, threads: int | None) -> dict[str, Any]:
    """One continual run (fresh folder); returns its command, settings and metrics."""
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark always measures a complete, fresh run
    cmd = [
        sys.executable, "-m", "anomalib_moleflow", "continual", "--config", str(CONFIG),
        "--data.root", args.root, "--run.output_dir", str(out_dir), *args.extra,
    ]  # fmt: skip
    if seed is not None:
        cmd += ["--run.seed", str(seed)]
    env = dict(os.environ)
    env.setdefault("MKL_CBWR", REPRODUCIBLE_MKL)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, check=False, env=env)  # noqa: S603 - our own interpreter and arguments
    if proc.returncode != 0:
        raise SystemExit(f"continual run failed with exit code {proc.returncode}")
    return {
        "seed": 0 if seed is None else seed,
        "threads": threads if threads is not None else (int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS") else None),
        "continual_command": shlex.join(cmd[1:]),
        "MKL_CBWR": env["MKL_CBWR"],
        "metrics": json.loads((out_dir / "continual_metrics.json").read_text()),
        "out_dir": out_dir,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the continual CLI (per seed and thread count), then write the results with the command;
    returns the JSON's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out_dir, results = Path(args.output_dir), Path(args.results_dir)
    combos = [(seed, threads) for threads in (args.threads or [None]) for seed in (args.seeds or [None])]
    start = time.perf_counter()
    runs = []
    for seed, threads in combos:
        folder = out_dir if len(combos) == 1 else out_dir / f"seed{seed}_threads{threads}"
        runs.append(run_once(args, folder, seed, threads))
    meta = finish_meta(run_meta("continual_real.py", argv), start)
    first = runs[0]
    meta["continual_command"] = first["continual_command"]
    meta["MKL_CBWR"] = first["MKL_CBWR"]
    data = {"meta": meta, "metrics": first["metrics"]}
    if len(runs) > 1:
        data["runs"] = [{k: v for k, v in r.items() if k != "out_dir"} for r in runs]
        data["spread"] = spread(runs)
    write_results(results, "continual_real", data, markdown)
    shutil.copy(first["out_dir"] / "continual_matrix.png", results / "continual_real_matrix.png")
    return data


if __name__ == "__main__":
    main()
