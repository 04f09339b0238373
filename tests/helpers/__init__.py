"""Helpers shared by the test files (not a test module): a tiny model configuration, a quiet
anomalib ``Engine``, bit-equality, image reading and a fresh-interpreter runner.

Synthetic data comes from the package itself (:mod:`anomalib_moleflow.data.synthetic`), which the
benchmarks and notebooks use too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.engine import Engine
from PIL import Image

from anomalib_moleflow.models.moleflow import MoLEFlowConfig

REPO = Path(__file__).resolve().parents[2]

#: A tiny, fast configuration (EfficientNet-Lite0 at 64 px, 2 coupling blocks, rank-2 LoRA): it
#: builds in about two seconds and runs a 64 px image in milliseconds on a CPU; its backbone
#: weights come from an installed package, so nothing is downloaded.
TINY_CONFIG: dict[str, dict[str, Any]] = {
    "features": {"backbone": "tf_efficientnet_lite0", "image_size": 64, "grid_downsample": 1},  # keep the 8x8 grid
    "flow": {"n_coupling_blocks": 2, "subnet_hidden_ratio": 0.5},
    "experts": {"lora_rank": 2, "dia_hidden_ratio": 0.25},
}


def tiny_config(**overrides: Any) -> MoLEFlowConfig:  # noqa: ANN401
    """:data:`TINY_CONFIG` with ``overrides`` (``"group.field"`` or plain field names)."""
    return MoLEFlowConfig.from_dict(TINY_CONFIG).updated(overrides)


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


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose tensors differ (or exist on one side only); empty when bit-identical."""
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if k not in a or k not in b or (isinstance(a[k], torch.Tensor) and not same_bits(a[k], b[k])) or (
            not isinstance(a[k], torch.Tensor) and a[k] != b[k]
        )
    ]


def read_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` float image in ``[0, 1]``, as anomalib's datasets deliver it."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def task_test_images(root: Path, task: str) -> list[Path]:
    """Test images (good and defective) of MVTec-layout task ``task`` under ``root``, sorted."""
    return sorted((root / task / "test").glob("*/*.png"))


def run_python(args: list[str] | tuple[str, ...], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a fresh interpreter: offline, one torch thread, this repository on the path."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # parallel test processes must not oversubscribe the cores
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("COLUMNS", "200")
    env.pop("TQDM_DISABLE", None)  # set by benchmarks/compare.py when a test runs it in-process
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def converted_weights(name: str) -> dict[str, torch.Tensor]:
    """The converted offline weights of backbone ``name`` (timm naming), from the weights cache."""
    from anomalib_moleflow.backbones import offline_weights_path

    return torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)


ANOMALIB_CLI = ("-c", "from anomalib.cli.cli import main; main()")
"""What the ``anomalib`` console script runs."""


def run_anomalib_cli(args: list[str], cwd: Path) -> str:
    """``anomalib ARGS`` in a fresh interpreter; its stdout + stderr (the command must succeed)."""
    completed = run_python([*ANOMALIB_CLI, *args], cwd)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    return output


def printed_metric(output: str, name: str) -> float:
    """Value of ``name`` in Lightning's test-metrics table (rich or plain)."""
    for line in output.splitlines():
        match = re.search(rf"\b{name}\b\s*[│|]?\s*([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))", line)
        if match:
            return float(match.group(1))
    msg = f"{name} not printed; output ends with:\n{output[-3000:]}"
    raise AssertionError(msg)


def train_task_steps(model: Any, key: str, features: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:  # noqa: ANN401 - a MoLEFlowModel
    """A few AdamW steps of ``model`` (a ``MoLEFlowModel``) on task ``key``'s plain mean NLL, over
    exactly the parameters ``prepare_task_training`` makes trainable; leaves the model in eval mode."""
    params = model.prepare_task_training(key)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = features[step % 2 :: 2] if len(features) > 1 else features
        z, log_jac_det = model.flow_forward(batch, key)
        loss = (0.5 * z.square().sum(-1) - log_jac_det).mean() + model.regularization(key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
