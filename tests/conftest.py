"""Shared fixtures: the tiny MoLE-Flow configuration and a tiny MVTec-layout dataset.

Tests run offline (``HF_HUB_OFFLINE=1``) and, unless ``OMP_NUM_THREADS`` says otherwise, with one
torch thread: the models here are tiny, and on a small machine shared with other jobs torch's
spinning worker threads made the Engine-based tests 10-40x slower. Set before any test runs;
inherited by the CLI subprocesses via the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from helpers import tiny_config as _tiny_config  # noqa: E402

from anomalib_moleflow.data.synthetic import make_task  # noqa: E402
from anomalib_moleflow.models.moleflow import MoLEFlowConfig  # noqa: E402

WIDGET_CATEGORY = "widget"


@pytest.fixture(scope="session")
def tiny_config() -> MoLEFlowConfig:
    """The tiny configuration (:data:`helpers.TINY_CONFIG`); change it with ``tiny_config.updated({...})``."""
    return _tiny_config()


@pytest.fixture(scope="session")
def widget_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder holding the tiny MVTec-layout category ``widget`` (12 training, 4 good and 4
    defective test images of 64 px; read it, don't write it)."""
    root = tmp_path_factory.mktemp("widget_mvtec")
    make_task(root, WIDGET_CATEGORY, style="red_stripes", n_train=12, n_good=4, n_defect=4, defect_name="defect")
    return root
