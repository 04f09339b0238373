"""Continual MoLE-Flow on the real stream (bottle then transistor): the issue's acceptance run.

    python benchmarks/continual_real.py --root ../shared/data/mvtec_ad

Runs ``python -m anomalib_moleflow continual --config configs/continual/mvtec_real.yaml``
in a subprocess (wall time and peak memory of that process are recorded), then copies
its ``continual_metrics.json`` into ``benchmarks/results/continual_real.json`` together
with the command, and writes a markdown table ``continual_real.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CONFIG = HERE.parent / "configs" / "continual" / "mvtec_real.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--output-dir", default="results/continual/benchmark_real")
    parser.add_argument("extra", nargs="*", help="more arguments for the continual command")
    args = parser.parse_args()
    out_dir = Path(args.output_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a benchmark always measures a complete, fresh run
    cmd = [
        sys.executable, "-m", "anomalib_moleflow", "continual", "--config", str(CONFIG),
        "--data.root", args.root, "--run.output_dir", str(out_dir), *args.extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"continual run failed with exit code {proc.returncode}")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    metrics = json.loads((out_dir / "continual_metrics.json").read_text())
    command = "python benchmarks/continual_real.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # the torch thread count changes floating-point order, hence the scores a little
        command = f"OMP_NUM_THREADS={threads} {command}"
    meta = {
        "command": command,
        "continual_command": " ".join(shlex.quote(c) for c in cmd[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": wall,
        "peak_rss_mib": peak_mib,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "continual_real.json").write_text(json.dumps({"meta": meta, "metrics": metrics}, indent=2) + "\n")
    shutil.copy(out_dir / "continual_matrix.png", RESULTS / "continual_real_matrix.png")
    lines = [
        "# Continual MoLE-Flow on the real stream (bottle -> transistor), task id hidden",
        "",
        f"Command: `{command}` ({meta['date']}, {meta['machine']}). Whole run: {wall / 60:.1f} min, "
        f"peak RSS {peak_mib:.0f} MiB.",
        "",
        "| task | image AUROC | pixel AUROC | pixel AP | routing acc. | oracle image AUROC | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    final, train_s = metrics["final"], metrics["timing"]["train_seconds"]
    for name in metrics["tasks"]:
        f = final[name]
        lines.append(
            f"| {name} | {f['image_AUROC']:.4f} | {f['pixel_AUROC']:.4f} | {f['pixel_AP']:.4f} | "
            f"{f['routing_accuracy']:.3f} | {f['oracle']['image_AUROC']:.4f} | {train_s[name]:.0f} |"
        )
    mean = metrics["mean"]
    lines.append(
        f"| **mean** | {mean['image_AUROC']:.4f} | {mean['pixel_AUROC']:.4f} | {mean['pixel_AP']:.4f} | "
        f"{mean['routing_accuracy']:.3f} | {mean['oracle']['image_AUROC']:.4f} | |"
    )
    forgetting = ", ".join(f"{k} {v}" for k, v in metrics["forgetting"].items() if not isinstance(v, dict))
    lines += [
        "",
        f"Forgetting (best earlier minus final): {forgetting}. "
        f"Inference: {metrics['timing']['inference_ms_per_image']:.1f} ms per image (routed, in-model time).",
    ]
    (RESULTS / "continual_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
