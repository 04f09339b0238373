"""The ablation presets (``anomalib_moleflow/configs/ablations/*.yaml``): one per version of the design
notes, each parsed by the ``continual`` parser and run end to end on a tiny synthetic stream.

Parametrized over the files found in the folder, so a new preset is tested without touching this file.
Each run: two 64 px products, one epoch, one batch, through ``cli.main`` in this process.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO

from anomalib_moleflow.cli import build_parser, continual_parser, main
from anomalib_moleflow.continual.run_checkpoint import load_run_checkpoint
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.models.moleflow import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.config import MS_CONTEXT_DROPPED, MS_CONTEXT_FORCED

PRESET_DIR = REPO / "anomalib_moleflow" / "configs" / "ablations"
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
NOTES = REPO.parent / "shared" / "spec" / "seed-update-notes.en.md"
TASKS = ["red_stripes", "blue_checker"]

#: Every version of the notes has a preset of this name (lower-case file names: the notes' V4 and
#: V4.1 are ``notes_v4`` / ``notes_v4_1``, apart from the lower-case v4 / v4.1).
REQUIRED = {
    "v1", "v2", "v3", "v4", "v4_1", "v5", "v6", "v7", "baseline_1_5", "baseline_2_0",
    "v3_1_whitening", "v3_2_ms_context", "v3_3_dia", "v3_4_ogp", "v3_5_hybrid_router", "v3_all",
    "notes_v4", "notes_v4_1", "default",
}  # fmt: skip

#: Pieces of a version that are not modules of this package: the preset's header must name them.
MISSING: dict[str, list[str]] = {}


def preset_id(path: Path) -> str:
    return path.stem


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of a nested dict (an empty dict is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def header(path: Path) -> list[str]:
    """The leading comment lines of a preset, without ``#``."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    return lines


def header_settings(lines: list[str]) -> set[str]:
    """Keys listed under ``sets:`` (``model.config.`` left out there, as in the file's header)."""
    start = lines.index(" sets:") + 1
    keys = set()
    for line in lines[start:]:
        if not line.strip():
            break
        match = re.match(r"\s{5}([a-z_]+\.[a-z_0-9]+):", line)
        if match:
            keys.add(match.group(1))
    return keys


def test_every_version_has_a_preset() -> None:
    names = {p.stem for p in PRESETS}
    assert REQUIRED <= names, sorted(REQUIRED - names)
    lowered = [n.lower() for n in names]
    assert len(lowered) == len(set(lowered))  # distinct on case-insensitive file systems


@pytest.mark.parametrize("path", PRESETS, ids=preset_id)
def test_preset_file_sets_only_model_and_run_switches_and_says_so(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(data) <= {"model", "run"}, f"{path.name}: a preset sets model switches and run options only"
    assert set(data["model"]) == {"config"}
    lines = header(path)
    assert lines[0].startswith(f" Ablation preset {path.stem}: ") and lines[0].endswith(".")
    set_keys = {k.removeprefix("model.config.") for k, v in leaves(data).items() if v != {}}
    assert header_settings(lines) == set_keys, f"{path.name}: the header's 'sets:' must list exactly what the file sets"
    if not set_keys:
        assert "   nothing" in lines
    text = "\n".join(lines)
    assert re.search(r"^ missing[: ]", text, re.MULTILINE), f"{path.name}: no 'missing' line in the header"
    for piece in MISSING.get(path.stem, []):
        assert piece in text.split(" missing", 1)[1], f"{path.name}: the header must list {piece!r} as missing"
    if path.stem not in MISSING and path.stem in REQUIRED:
        assert " missing: none" in text
    notes_line = next(line for line in lines if line.startswith(" notes: "))
    headings = re.findall(r'"(## [^"]+)"', notes_line)
    assert headings, f"{path.name}: the notes line quotes no heading of the notes"
    if NOTES.is_file():  # the design notes sit beside the repository in this workplace
        notes_headings = {line.strip() for line in NOTES.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}
        assert set(headings) <= notes_headings, set(headings) - notes_headings


def test_v3_all_reruns_the_notes_conflicting_whitening_and_ms_context() -> None:
    """The notes' "All V3 (conflict)" row ran whitening with the MS context; v3_all keeps both."""
    data = yaml.safe_load((PRESET_DIR / "v3_all.yaml").read_text(encoding="utf-8"))
    with pytest.warns(UserWarning) as caught:
        cfg = MoLEFlowConfig.from_dict(data["model"]["config"])
    assert [str(w.message) for w in caught] == [MS_CONTEXT_FORCED]
    assert cfg.experts.input_adapter == "whitening" and cfg.effective_ms_context


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-product synthetic stream and a stream config for it: (config, work folder)."""
    tmp = tmp_path_factory.mktemp("ablations")
    data_root = make_stream(tmp / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    config = {
        "model": {"config": {}},
        "data": {"root": str(data_root), "tasks": TASKS, "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0},
        "trainer": {"max_epochs": 16, "later_task_epochs": 32, "limit_train_batches": 1},
        "run": {"output_dir": str(tmp / "unused")},
    }
    path = tmp / "stream.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp


@pytest.mark.parametrize("path", PRESETS, ids=preset_id)
def test_preset_parses_through_the_continual_parser(path: Path, stream: tuple[Path, Path]) -> None:
    """Stacked on a stream config, the preset gives exactly its switches to the runner's objects."""
    stream_config, _ = stream
    cfg = build_parser().parse_args(["continual", "--config", str(stream_config), "--config", str(path)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init = continual_parser().instantiate_classes(cfg.continual)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert init.model.config == MoLEFlowConfig.from_dict(data["model"]["config"])
    for key, value in data.get("run", {}).items():
        assert getattr(init.run, key) == value
    assert init.data.names == TASKS and init.trainer.max_epochs == 16  # the stream config's, untouched
    dropped = [w for w in caught if str(w.message) == MS_CONTEXT_DROPPED]
    forced = [w for w in caught if str(w.message) == MS_CONTEXT_FORCED]
    model = init.model.config
    conflict = model.flow.use_ms_context and model.experts.input_adapter == "whitening"
    assert bool(dropped) == (conflict and not model.flow.force_ms_context)
    assert bool(forced) == (conflict and model.flow.force_ms_context)
    assert model.effective_ms_context == (model.flow.use_ms_context and not dropped)


@pytest.mark.parametrize("path", PRESETS, ids=preset_id)
def test_preset_runs_end_to_end(path: Path, stream: tuple[Path, Path]) -> None:
    """Two products, 64 px, one epoch of one batch per task, overridden on the command line."""
    stream_config, tmp = stream
    out = tmp / "runs" / path.stem
    args = [
        "continual", "--config", str(stream_config), "--config", str(path),
        "--model.config.features.image_size", "64",
        "--trainer.max_epochs", "1", "--trainer.later_task_epochs", "1",
        "--run.output_dir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "continual_metrics.json").read_text())
    assert metrics["tasks"] == TASKS and set(metrics["final"]) == set(TASKS)
    for name in TASKS:
        row = metrics["final"][name]
        for key in ("image_AUROC", "pixel_AUROC", "routing_accuracy"):
            assert row[key] is not None and 0.0 <= row[key] <= 1.0, (path.stem, name, key)
    checkpoint, _ = load_run_checkpoint(out / "checkpoints" / f"task_01_{TASKS[1]}.ckpt")
    preset = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["config"]
    expected = MoLEFlowConfig.from_dict(preset).updated({"features.image_size": 64})
    assert MoLEFlowConfig.from_dict(checkpoint["hyper_parameters"]["config"]) == expected  # the switches reached the model
