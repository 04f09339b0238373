"""Continual MoLE-Flow on the real stream (bottle then transistor), task id hidden: the acceptance run.

    python benchmarks/continual_real.py --root ../shared/data/mvtec_ad

Runs ``python -m anomalib_moleflow continual --config configs/continual/mvtec_real.yaml``
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

from reporting import continual_table, finish_meta, header_line, run_meta, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE.parent / "configs" / "continual" / "mvtec_real.yaml"
REPRODUCIBLE_MKL = "AUTO,STRICT"
"""``MKL_CBWR`` for the run unless set: without it MKL's results may depend on memory alignment, and
two runs of the same command on one CPU were seen to differ (bottle pixel AUROC 0.9749 vs 0.9735)."""


def markdown(data: dict[str, Any]) -> str:
    """``continual_real.md`` from what ``continual_real.json`` holds."""
    lines = [
        "# Continual MoLE-Flow on the real stream (bottle -> transistor), task id hidden",
        "",
        header_line(data["meta"]),
        "",
        *continual_table(data["metrics"]),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/mvtec_ad", help="folder holding the MVTec AD categories")
    parser.add_argument("--output-dir", default="results/continual/benchmark_real", help="the continual run's folder")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where continual_real.{json,md} go")
    parser.add_argument("extra", nargs="*", help="more arguments for the continual command")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the continual CLI, then write its results with the command; returns the JSON's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out_dir, results = Path(args.output_dir), Path(args.results_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark always measures a complete, fresh run
    cmd = [
        sys.executable, "-m", "anomalib_moleflow", "continual", "--config", str(CONFIG),
        "--data.root", args.root, "--run.output_dir", str(out_dir), *args.extra,
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("MKL_CBWR", REPRODUCIBLE_MKL)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env)  # noqa: S603 - our own interpreter and arguments
    if proc.returncode != 0:
        raise SystemExit(f"continual run failed with exit code {proc.returncode}")
    meta = finish_meta(run_meta("continual_real.py", argv), start)
    meta["continual_command"] = shlex.join(cmd[1:])
    meta["MKL_CBWR"] = env["MKL_CBWR"]
    data = {"meta": meta, "metrics": json.loads((out_dir / "continual_metrics.json").read_text())}
    write_json(results / "continual_real.json", data)
    shutil.copy(out_dir / "continual_matrix.png", results / "continual_real_matrix.png")
    (results / "continual_real.md").write_text(markdown(data))
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
