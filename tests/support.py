"""Helpers shared by several test files (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from anomalib.engine import Engine

REPO = Path(__file__).resolve().parents[1]


def quiet_engine(root: Path, max_epochs: int) -> Engine:
    """anomalib ``Engine`` on the CPU without logger or progress bar."""
    return Engine(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` that also treats NaN (e.g. not-yet-fitted statistics) as equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


def run_python(args: list[str] | tuple[str, ...], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter: offline, one torch thread, this repository on the path."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # parallel test processes must not oversubscribe the cores
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("COLUMNS", "200")
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
