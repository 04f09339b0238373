"""The continual task stream: config parsing, validation errors naming task and path, datamodules."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from anomalib.data import Folder
from anomalib.data.datasets.image.folder import make_folder_dataset
from anomalib.data.datasets.image.mvtecad import CATEGORIES
from helpers import REPO
from PIL import Image

from anomalib_moleflow.continual.task_stream import (
    MVTEC_ALPHABETICAL_ORDER,
    MVTEC_ORIGINAL_ORDER,
    TaskSpec,
    TaskStream,
)
from anomalib_moleflow.data import MVTecADLocal

REAL_ROOT = REPO.parent / "shared" / "data" / "mvtec_ad"
CONFIGS = REPO / "anomalib_moleflow" / "configs" / "continual"


def _png(path: Path, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        Image.fromarray((np.arange(64).reshape(8, 8) % 2 * 255).astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def _mvtec(root: Path, category: str) -> None:
    for k in range(2):
        _png(root / category / "train" / "good" / f"{k:03d}.png")
        _png(root / category / "test" / "good" / f"{k:03d}.png")
        _png(root / category / "test" / "crack" / f"{k:03d}.png")
        _png(root / category / "ground_truth" / "crack" / f"{k:03d}_mask.png", mask=True)


def _folder(root: Path, n_bad: int = 2, mask_names: list[str] | None = None) -> None:
    for k in range(3):
        _png(root / "good" / f"{k:03d}.png")
    for k in range(n_bad):
        _png(root / "bad" / f"{k:03d}.png")
    for name in mask_names if mask_names is not None else [f"{k:03d}_mask.png" for k in range(n_bad)]:
        _png(root / "masks" / name, mask=True)


def _folder_task(root: Path, name: str = "part") -> dict:
    return {"name": name, "kind": "folder", "root": str(root), "normal_dir": "good", "abnormal_dir": "bad",
            "mask_dir": "masks"}  # fmt: skip


def test_orders() -> None:
    assert len(MVTEC_ORIGINAL_ORDER) == 15
    assert set(MVTEC_ORIGINAL_ORDER) == set(CATEGORIES)
    assert list(MVTEC_ALPHABETICAL_ORDER) == sorted(CATEGORIES)
    assert MVTEC_ORIGINAL_ORDER[:3] == ("leather", "grid", "transistor")


def test_from_dict_strings_and_dicts(tmp_path: Path) -> None:
    stream = TaskStream.from_dict(
        {"root": "/r", "tasks": ["bottle", _folder_task(tmp_path), {"name": "b2", "category": "bottle", "root": "/o"}],
         "train_batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
    )  # fmt: skip
    assert stream.names == ["bottle", "part", "b2"]
    assert len(stream) == 3
    assert stream[0] == TaskSpec(name="bottle", kind="mvtec", category="bottle")
    assert stream[1].kind == "folder"
    assert stream.task_root(0) == Path("/r") and stream.task_root(2) == Path("/o")
    assert TaskStream.from_dict(stream.to_dict()).to_dict() == stream.to_dict()
    with pytest.raises(ValueError, match="image_size"):
        TaskStream.from_dict({"tasks": ["bottle"], "image_size": 256})
    with pytest.raises(ValueError, match="normal dir"):
        TaskSpec.from_value({"name": "x", "normal dir": "good"})
    with pytest.raises(ValueError, match="unknown kind"):
        TaskSpec(name="x", kind="zip")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mvtec_real", "mvtec15_original", "mvtec15_alphabetical"])
def test_configs_parse(name: str) -> None:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert set(config) == {"model", "data", "trainer", "run"}
    stream = TaskStream.from_dict(config["data"])
    expected = {"mvtec_real": ["bottle", "transistor"], "mvtec15_original": list(MVTEC_ORIGINAL_ORDER),
                "mvtec15_alphabetical": list(MVTEC_ALPHABETICAL_ORDER)}[name]  # fmt: skip
    assert stream.names == expected
    assert config["trainer"]["max_epochs"] == 16 and config["trainer"]["later_task_epochs"] == 32
    assert config["run"]["output_dir"] == f"results/continual/{name}"


def test_jsonargparse_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TaskStream, "data")
    config = parser.parse_args(["--data.tasks", "[bottle, {name: p, kind: folder, normal_dir: /x}]", "--data.root=/r"])
    stream = parser.instantiate_classes(config).data
    assert isinstance(stream, TaskStream)
    assert stream.names == ["bottle", "p"] and stream.root == "/r"


def test_missing_train_dir_names_task_and_path(tmp_path: Path) -> None:
    _mvtec(tmp_path, "bottle")
    (tmp_path / "cable").mkdir()
    stream = TaskStream(["bottle", "cable"], root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        stream.validate()
    message = str(info.value)
    assert "task 1 'cable'" in message and str(tmp_path / "cable" / "train" / "good") in message
    assert "bottle'" not in message.split("\n", 1)[1]  # only the broken task is reported


def test_empty_train_dir(tmp_path: Path) -> None:
    _mvtec(tmp_path, "bottle")
    for png in (tmp_path / "bottle" / "train" / "good").iterdir():
        png.unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)task 0 'bottle'.*train/good"):
        TaskStream(["bottle"], root=str(tmp_path)).validate()


def test_unknown_category_and_all_problems_listed(tmp_path: Path) -> None:
    _mvtec(tmp_path, "bottle")
    stream = TaskStream(["bottle", "bottel", "cable"], root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        stream.validate()
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "task 1 'bottel'" in message and "Unknown category 'bottel'" in message
    assert "task 2 'cable'" in message and str(tmp_path / "cable") in message


def test_duplicate_names(tmp_path: Path) -> None:
    _mvtec(tmp_path, "bottle")
    stream = TaskStream(["bottle", {"name": "bottle", "root": str(tmp_path)}], root=str(tmp_path))
    with pytest.raises(ValueError, match=r"task 1 'bottle'.*duplicate task name \(also task 0\)"):
        stream.validate()


def test_folder_task_without_training_images(tmp_path: Path) -> None:
    _folder(tmp_path)
    for png in (tmp_path / "good").iterdir():
        png.unlink()
    expected = re.escape(f"task 0 'part' (folder): normal_dir '{tmp_path / 'good'}' has no training images")
    with pytest.raises(FileNotFoundError, match=expected):
        TaskStream([_folder_task(tmp_path)]).validate()
    with pytest.raises(ValueError, match="needs 'normal_dir'"):
        TaskStream([{"name": "p", "kind": "folder", "root": str(tmp_path)}]).validate()


def test_folder_masks_mismatched(tmp_path: Path) -> None:
    _folder(tmp_path, mask_names=["000_mask.png", "007_mask.png"])
    with pytest.raises(ValueError, match=rf"task 0 'part'.*{re.escape(str(tmp_path / 'bad' / '001.png'))}"):
        TaskStream([_folder_task(tmp_path)]).validate()
    # anomalib agrees that this folder is broken
    with pytest.raises(Exception, match="Mismatch"):
        make_folder_dataset(normal_dir="good", root=tmp_path, abnormal_dir="bad", mask_dir="masks")


def test_folder_extra_mask(tmp_path: Path) -> None:
    _folder(tmp_path, mask_names=["000_mask.png", "001_mask.png", "002_mask.png"])
    with pytest.raises(ValueError, match="2 abnormal images but 3 masks"):
        TaskStream([_folder_task(tmp_path)]).validate()


def test_folder_masks_sort_order_mirrors_anomalib(tmp_path: Path) -> None:
    """Each image has a mask, but sorted pairing (what anomalib does) fails: 1/10/2 vs 10_mask/1_mask/2_mask."""
    for stem in ("1", "10", "2"):
        _png(tmp_path / "good" / f"{stem}.png")
        _png(tmp_path / "bad" / f"{stem}.png")
        _png(tmp_path / "masks" / f"{stem}_mask.png", mask=True)
    with pytest.raises(ValueError, match="sorted order"):
        TaskStream([_folder_task(tmp_path)]).validate()
    with pytest.raises(Exception, match="Mismatch"):
        make_folder_dataset(normal_dir="good", root=tmp_path, abnormal_dir="bad", mask_dir="masks")


@pytest.mark.parametrize("mask_suffix", ["", "_mask"])
def test_valid_folder_task_builds_and_sets_up(tmp_path: Path, mask_suffix: str) -> None:
    _folder(tmp_path, mask_names=[f"{k:03d}{mask_suffix}.png" for k in range(2)])
    stream = TaskStream([_folder_task(tmp_path)], train_batch_size=2, eval_batch_size=2, num_workers=0)
    stream.validate()
    datamodule = stream.datamodule(0)
    assert isinstance(datamodule, Folder)
    datamodule.setup()
    assert len(datamodule.test_data) >= 2
    assert (datamodule.test_data.samples.mask_path != "").sum() == 2


@pytest.mark.skipif(not (REAL_ROOT / "bottle").is_dir(), reason="real MVTec AD data not available")
def test_real_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # relative paths start from the directory the run is started in
    TaskStream.from_dict(yaml.safe_load((CONFIGS / "mvtec_real.yaml").read_text())["data"]).validate()
    stream = TaskStream(list(MVTEC_ORIGINAL_ORDER), root=str(REAL_ROOT))
    with pytest.raises(FileNotFoundError) as info:  # the shared data holds 2 of the 15 categories
        stream.validate()
    assert "13 problem(s)" in str(info.value) and "task 0 'leather'" in str(info.value)
    assert "'transistor'" not in str(info.value).split("\n", 1)[1]


@pytest.mark.skipif(not (REAL_ROOT / "bottle").is_dir(), reason="real MVTec AD data not available")
def test_real_stream_builds_datamodules() -> None:
    stream = TaskStream(["bottle", "transistor"], root=str(REAL_ROOT), train_batch_size=4, num_workers=0)
    stream.validate()
    modules = [stream.datamodule(i) for i in range(len(stream))]
    assert all(isinstance(m, MVTecADLocal) for m in modules)
    assert [m.category for m in modules] == ["bottle", "transistor"]
    assert modules[0].train_batch_size == 4
    modules[1].setup()
    assert len(modules[1].train_data) == 213
    assert len(modules[1].test_data) == 100


def test_task_spec_values() -> None:
    assert TaskSpec.from_value("bottle") == TaskSpec(name="bottle", category="bottle")
    spec = TaskSpec(name="p", kind="folder", root=Path("/data"), normal_dir=Path("good"))  # type: ignore[arg-type]
    assert spec.root == "/data" and spec.normal_dir == "good" and spec.category is None
    assert spec.to_dict() == {"name": "p", "kind": "folder", "root": "/data", "normal_dir": "good"}
    assert TaskSpec.from_value(spec) is spec
    with pytest.raises(ValueError, match="has no 'name'"):
        TaskSpec.from_value({"category": "bottle"})
    with pytest.raises(TypeError, match="category name or a dict, got int: 3"):
        TaskSpec.from_value(3)  # type: ignore[arg-type]


def test_stream_settings_and_errors(tmp_path: Path) -> None:
    single = TaskStream("bottle", root="/r")  # a lone task is a one-task stream
    assert single.names == ["bottle"] and repr(single) == "TaskStream(tasks=['bottle'], root='/r')"
    assert [t.name for t in TaskStream(["a", "b"])] == ["a", "b"]
    with pytest.raises(ValueError, match="needs 'tasks'"):
        TaskStream.from_dict({"root": "/r"})
    with pytest.raises(ValueError, match="task stream is empty"):
        TaskStream([]).validate()
    _mvtec(tmp_path, "bottle")
    with pytest.raises(ValueError, match=r"task 1 'a/b'.*without '/'"):
        TaskStream(["bottle", {"name": "a/b", "category": "bottle"}], root=str(tmp_path)).validate()


def test_mvtec_datamodule_settings(tmp_path: Path) -> None:
    _mvtec(tmp_path, "bottle")
    stream = TaskStream(
        ["bottle", {"name": "again", "category": "bottle"}], root=str(tmp_path), train_batch_size=3, eval_batch_size=5,
        num_workers=0, seed=7,
    )  # fmt: skip
    stream.validate()
    modules = [stream.datamodule(i) for i in range(2)]
    assert all(isinstance(m, MVTecADLocal) for m in modules)
    assert [m.category for m in modules] == ["bottle", "bottle"]
    assert (modules[1].train_batch_size, modules[1].eval_batch_size, modules[1].num_workers) == (3, 5, 0)
    assert modules[0] is not stream.datamodule(0)  # a fresh one each time
    modules[1].setup()
    assert len(modules[1].train_data) == 2 and len(modules[1].test_data) == 4


def test_folder_root_and_mask_without_abnormal_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"task 0 'part' \(folder\): root folder '{re.escape(str(missing))}'"):
        TaskStream([_folder_task(missing)]).validate()
    _folder(tmp_path)
    task = {**_folder_task(tmp_path), "abnormal_dir": None}
    with pytest.raises(ValueError, match=r"'mask_dir' \(masks\) is given without 'abnormal_dir'"):
        TaskStream([task]).validate()
    with pytest.raises(FileNotFoundError, match=rf"abnormal_dir '{re.escape(str(tmp_path / 'nope'))}' does not exist"):
        TaskStream([{**_folder_task(tmp_path), "abnormal_dir": "nope"}]).validate()


@pytest.mark.parametrize("kind", ["mvtec", "folder"])
def test_threshold_holdout_splits_training_images_off(tmp_path: Path, kind: str) -> None:
    """With ``threshold_holdout`` the validation split (the thresholds' images) is a part of the training
    images, which training no longer sees; without it, the validation split is the test set."""
    if kind == "mvtec":
        for k in range(8):
            _png(tmp_path / "bottle" / "train" / "good" / f"{k:03d}.png")
        _mvtec(tmp_path, "bottle")  # adds test images (and 2 more training ones, 000/001 again)
        task: str | dict = "bottle"
    else:
        _folder(tmp_path)
        for k in range(3, 8):
            _png(tmp_path / "good" / f"{k:03d}.png")
        task = {**_folder_task(tmp_path), "normal_test_dir": None}
    plain = TaskStream([task], root=str(tmp_path), num_workers=0, seed=3)
    held = TaskStream([task], root=str(tmp_path), num_workers=0, seed=3, threshold_holdout=0.25)
    default, split = plain.datamodule(0), held.datamodule(0)
    default.setup()
    split.setup()
    assert list(default.val_data.samples.image_path) == list(default.test_data.samples.image_path)
    train, val = set(split.train_data.samples.image_path), set(split.val_data.samples.image_path)
    assert len(val) >= 1 and not train & val  # a part of the training images, disjoint from training
    assert len(val) == (2 if kind == "mvtec" else 1)  # a quarter of 8 (mvtec) or of the 6 left after the test split
    assert train | val == set(default.train_data.samples.image_path)
    assert (split.val_data.samples.label_index == 0).all()  # normal images only
    assert list(split.test_data.samples.image_path) == list(default.test_data.samples.image_path)
    assert "test split" in plain.threshold_split and "25% of the task's training images" in held.threshold_split
    assert "0.99 quantile" in held.threshold_split


def test_threshold_holdout_in_the_settings() -> None:
    assert "threshold_holdout" not in TaskStream(["a"]).to_dict()  # unset: the settings of earlier runs
    held = TaskStream(["a"], threshold_holdout=0.1)
    assert held.to_dict()["threshold_holdout"] == 0.1
    assert TaskStream.from_dict(held.to_dict()).threshold_holdout == 0.1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"data.threshold_holdout must be in \[0, 1\)"):
            TaskStream(["a"], threshold_holdout=bad)
