"""``anomalib-moleflow merge``: one continual run from a base run and experts trained apart.

    anomalib-moleflow continual --config C.yaml --data.tasks '[bottle]' --run.output_dir base
    anomalib-moleflow continual --config C.yaml --run.only_task 1 --run.base base --run.output_dir part_1   # one per task,
    anomalib-moleflow continual --config C.yaml --run.only_task 2 --run.base base --run.output_dir part_2   # in parallel
    anomalib-moleflow merge --base base --parts part_1 part_2 --output merged

The merged folder is the run the sequential training writes (checkpoints, results), with the
experts bit-identical to the sequential run's at one torch thread.
"""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser

from anomalib_moleflow.cli.continual import format_summary
from anomalib_moleflow.continual.merge import merge_parts

HELP = "merge experts trained apart (continual --run.only_task) into one continual run"


def parser() -> ArgumentParser:
    """Parser of the ``merge`` subcommand."""
    p = ArgumentParser(description="Merge experts trained apart onto their base run; evaluate as the sequential run does.")
    p.add_argument("--base", type=str, required=True, help="the base run folder (or its last task checkpoint)")
    p.add_argument("--parts", type=str, nargs="+", required=True, help="the part folders (or expert_XX_<name>.ckpt files)")
    p.add_argument("--output", type=str, required=True, help="folder of the merged run")
    p.add_argument("--resume", type=bool, default=False, help="continue a merge that stopped")
    p.add_argument("--data.num_workers", type=int | None, default=None, help="DataLoader workers (default: the parts')")
    return p


def run(cfg: Any) -> int:  # noqa: ANN401 - a jsonargparse namespace
    """Merge and print the merged run's summary."""
    results = merge_parts(cfg.base, list(cfg.parts), cfg.output, resume=cfg.resume, num_workers=cfg.data.num_workers)
    print(format_summary(results.to_dict()))
    print(f"merged run written to {cfg.output}")
    return 0
