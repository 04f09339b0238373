"""The notebooks in ``notebooks/``, executed top to bottom on tiny settings.

Each notebook's ``parameters`` cell (papermill's convention) holds defaults for the real data; a cell
injected right after it points the notebook at tiny synthetic products (or, for the benchmark
notebook, only at a temporary output folder), with the tiny model, one epoch and few images. Any
cell error fails the test. Every figure a notebook saves is checked for its size and for content.

The committed notebooks are checked as well: no outputs, no execution counts, no absolute paths.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import nbclient  # the test extra: pip install ".[test]" (nbclient, nbformat, ipykernel)
import nbformat
import numpy as np
import pytest
from helpers import REPO, TINY_CONFIG
from PIL import Image

from anomalib_moleflow.data.synthetic import make_stream

NOTEBOOKS = REPO / "notebooks"
PRODUCTS = ["red_stripes", "blue_checker", "green_dots"]
#: Figures (``OUTPUT_DIR/<name>.png``) each notebook must save.
FIGURES: dict[str, set[str]] = {
    "01_quickstart": {"data_samples", "test_metrics", "score_histogram", "visualizer", "overlays"},
    "02_continual_stream": {
        "accuracy_matrix", "forgetting", "routing_confusion", "score_histograms", "heatmap_gallery", "after_adding_product",
    },
    "03_inside_moleflow": {"parameters", "nll_maps", "flow_variants", "router_distances", "score_shares", "switch_effect"},
    "04_deploy": {"score_agreement", "openvino_predictions", "latency_throughput"},
    "05_benchmarks": {
        "quality", "forgetting", "latency_throughput", "memory_parameters", "quality_real_products",
        "continual_real_seeds", "single_task", "export_speed", "scale",
    },
}  # fmt: skip
#: Packages a notebook needs beyond the test extra (the export extra, and ONNX Runtime).
NEEDS: dict[str, tuple[str, ...]] = {"04_deploy": ("onnx", "onnxscript", "openvino", "onnxruntime")}
MIN_SIZE = (300, 200)
"""Smallest figure (width, height) in pixels."""
MIN_PIXEL_STD = 8.0
"""A figure's pixel values (0-255) must spread at least this much: not blank, not one colour."""
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(/work|/home|/tmp|/Users|/root|/mnt|[A-Za-z]:\\\\)")


def _tiny_overrides(name: str, data: Path, output: Path) -> dict[str, Any]:
    """Parameter values that make notebook ``name`` run in seconds on the synthetic products in ``data``."""
    tiny = {"MODEL_CONFIG": TINY_CONFIG, "IMAGE_SIZE": 64, "EPOCHS": 1, "BATCH_SIZE": 8, "MVTEC_ROOT": str(data)}
    values: dict[str, dict[str, Any]] = {
        "01_quickstart": {**tiny, "PRODUCT": PRODUCTS[0], "N_SHOW": 2},
        "02_continual_stream": {**tiny, "LATER_EPOCHS": 1, "TASKS": PRODUCTS[:2], "NEW_TASK": PRODUCTS[2], "N_GALLERY": 2},
        "03_inside_moleflow": {**tiny, "LATER_EPOCHS": 1, "TASKS": PRODUCTS[:2], "N_IMAGES": 2},
        "04_deploy": {**tiny, "LATER_EPOCHS": 1, "TASKS": PRODUCTS[:2], "TIMING_RUNS": 2, "THROUGHPUT_BATCH": 8},
        "05_benchmarks": {},
    }
    return {**values[name], "OUTPUT_DIR": str(output)}


def _parameters_index(notebook: Any) -> int:  # noqa: ANN401 - an nbformat notebook
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def synthetic_products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny synthetic products in the MVTec AD layout (8 training, 2 good and 2 defective test images)."""
    return make_stream(tmp_path_factory.mktemp("notebook_data"), PRODUCTS, n_train=8, n_good=2, n_defect=2)


def test_every_notebook_is_tested() -> None:
    assert {path.stem for path in _notebook_paths()} == set(FIGURES)


@pytest.mark.parametrize("path", _notebook_paths(), ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path: Path) -> None:
    """Stored without outputs or execution counts, one parameters cell, and no absolute paths."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert 10 <= len(notebook.cells) <= 25, f"{path.name}: {len(notebook.cells)} cells"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} carries outputs"
            assert cell.execution_count is None, f"{path.name} cell {index} carries an execution count"
    _parameters_index(notebook)
    text = path.read_text()
    match = ABSOLUTE_PATH.search(text)
    assert match is None, f"{path.name} holds an absolute path near {text[max(0, match.start() - 40) : match.end() + 40]!r}"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"


def _check_figure(path: Path) -> None:
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert width >= MIN_SIZE[0] and height >= MIN_SIZE[1], f"{path.name} is only {width}x{height} px"
    assert pixels.std() >= MIN_PIXEL_STD, f"{path.name} is nearly blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, f"{path.name} has almost a single colour"


@pytest.mark.parametrize("path", _notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(
    path: Path, synthetic_products: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executed in a fresh kernel (the venv's Python) from ``notebooks/`` with the tiny parameters."""
    missing_packages = [name for name in NEEDS.get(path.stem, ()) if find_spec(name) is None]
    if missing_packages:
        pytest.skip(f"{path.name} needs {', '.join(missing_packages)} (pip install '.[export]' onnxruntime)")
    notebook = nbformat.read(path, as_version=4)
    output = tmp_path / "output"
    overrides = _tiny_overrides(path.stem, synthetic_products, output)
    parameters = notebook.cells[_parameters_index(notebook)].source
    unknown = [key for key in overrides if not re.search(rf"^{key} = ", parameters, re.MULTILINE)]
    assert not unknown, f"{path.name}: the parameters cell does not set {unknown}"
    source = "\n".join([
        "# injected by tests/integration/test_notebooks.py: tiny settings, and the kernel must be this Python",
        *(f"{key} = {json.loads(json.dumps(value))!r}" for key, value in overrides.items()),
        "import sys",
        f"assert sys.prefix == {sys.prefix!r}, f'the kernel runs {{sys.executable}}, not the Python of the tests'",
    ])
    notebook.cells.insert(_parameters_index(notebook) + 1, nbformat.v4.new_code_cell(source))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    before = sorted(NOTEBOOKS.rglob("*"))
    client.execute()  # raises CellExecutionError naming the failing cell
    written = sorted(set(NOTEBOOKS.rglob("*")) - set(before))
    assert not written, f"{path.name} wrote into notebooks/ with OUTPUT_DIR elsewhere: {written[:5]}"
    saved = {png.stem: png for png in output.glob("*.png")}
    missing = FIGURES[path.stem] - set(saved)
    assert not missing, f"{path.name} did not save {sorted(missing)} (saved {sorted(saved)})"
    for png in saved.values():
        _check_figure(png)
