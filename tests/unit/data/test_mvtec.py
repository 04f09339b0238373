"""The local MVTec AD datamodule: never downloads, and every error names the path.

Everything runs on tiny MVTec-layout trees generated under ``tmp_path``; any
network use fails the test.
"""

from __future__ import annotations

import socket
from pathlib import Path

import anomalib.data.datamodules.image.mvtecad as anomalib_mvtecad_module
import anomalib.data.utils.download as anomalib_download_module
import numpy as np
import pytest
from anomalib.data import MVTecAD
from PIL import Image

from anomalib_moleflow.data import (
    ImageReadError,
    MVTecADLocal,
    MVTecADLocalDataset,
    check_mvtec_layout,
)

SIZE = 32


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly on any download attempt or socket connection."""

    def forbidden(*args: object, **kwargs: object) -> None:
        msg = f"network access attempted: {args!r}"
        raise AssertionError(msg)

    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # local (AF_UNIX) sockets of DataLoader workers are fine
            forbidden(address)
        return real_connect(sock, address)

    monkeypatch.setattr(anomalib_mvtecad_module, "download_and_extract", forbidden)
    monkeypatch.setattr(anomalib_download_module, "download_and_extract", forbidden)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)


def _png(path: Path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":  # binary mask, MVTec style {0, 255}
        array = np.zeros((SIZE, SIZE), dtype=np.uint8)
        array[8:16, 8:16] = 255
    else:
        array = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(array, mode=mode).save(path)


def make_tree(root: Path, category: str = "widget", n_train: int = 4) -> Path:
    """A tiny MVTec AD layout: train/good, test/{good,crack}, ground_truth/crack."""
    cat = root / category
    for i in range(n_train):
        _png(cat / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png", 100 + i)
        _png(cat / "test" / "crack" / f"{i:03d}.png", 200 + i)
        _png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", 0, mode="L")
    return cat


def _datamodule(root: Path, category: str = "widget", **kwargs: object) -> MVTecADLocal:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("train_batch_size", 2)
    kwargs.setdefault("eval_batch_size", 2)
    return MVTecADLocal(root=root, category=category, **kwargs)


def test_is_an_anomalib_mvtec_datamodule() -> None:
    assert issubclass(MVTecADLocal, MVTecAD)


def test_valid_tree_loads(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dm = _datamodule(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert isinstance(dm.train_data, MVTecADLocalDataset)
    assert len(dm.train_data) == 4
    assert len(dm.test_data) == 4
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch.image.shape) == (2, 3, SIZE, SIZE)
    test_batches = list(dm.test_dataloader())
    labels = sorted(int(label) for b in test_batches for label in b.gt_label)
    assert labels == [0, 0, 1, 1]
    masks = [b.gt_mask for b in test_batches]
    assert all(m is not None and tuple(m.shape[-2:]) == (SIZE, SIZE) for m in masks)


def test_real_category_name_in_custom_root(tmp_path: Path) -> None:
    make_tree(tmp_path, category="bottle")
    dm = _datamodule(tmp_path, category="bottle")
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_data) == 4


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_mvtec"
    dm = _datamodule(missing, category="bottle")
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "--data.root" in message
    assert "never downloads" in message


def test_root_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _datamodule(not_a_dir).prepare_data()


def test_missing_mvtec_category_lists_what_exists(tmp_path: Path) -> None:
    make_tree(tmp_path, category="bottle")
    with pytest.raises(FileNotFoundError) as info:
        _datamodule(tmp_path, category="cable").prepare_data()
    message = str(info.value)
    assert str(tmp_path / "cable") in message
    assert "category 'cable' not found" in message
    assert "bottle" in message  # what was found instead
    assert "--data.root" in message


def test_unknown_category_without_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, category="bottle")
    with pytest.raises(FileNotFoundError) as info:
        _datamodule(tmp_path, category="bottel").prepare_data()
    message = str(info.value)
    assert "Unknown category 'bottel'" in message
    assert "not one of the 15 MVTec AD categories" in message
    assert str(tmp_path / "bottel") in message
    assert "train/good" in message  # the layout that was looked for


def test_setup_without_prepare_data_checks_too(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.setup()


def test_missing_train_good(tmp_path: Path) -> None:
    (tmp_path / "widget" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        _datamodule(tmp_path).prepare_data()
    message = str(info.value)
    assert "no 'train/good' folder" in message
    assert str(tmp_path / "widget" / "train" / "good") in message


def test_empty_train_good(tmp_path: Path) -> None:
    cat = make_tree(tmp_path, n_train=0)
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "train" / "good" / "000.jpg").write_bytes(b"not a png")  # only .png counts
    with pytest.raises(FileNotFoundError) as info:
        _datamodule(tmp_path).prepare_data()
    message = str(info.value)
    assert "No training images" in message
    assert str(cat / "train" / "good") in message
    assert ".png" in message


def test_missing_test_folder(tmp_path: Path) -> None:
    cat = tmp_path / "widget"
    _png(cat / "train" / "good" / "000.png", 0)
    with pytest.raises(FileNotFoundError) as info:
        _datamodule(tmp_path).prepare_data()
    message = str(info.value)
    assert "No test images" in message
    assert str(cat / "test") in message
    assert "test_split_mode" in message
    # Without a test folder from disk the check does not ask for one.
    assert check_mvtec_layout(tmp_path, "widget", test_split_mode="synthetic") == cat


def test_missing_masks(tmp_path: Path) -> None:
    cat = make_tree(tmp_path)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError) as info:
        _datamodule(tmp_path).prepare_data()
    message = str(info.value)
    assert "'crack'" in message
    assert str(cat / "ground_truth" / "crack") in message


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    cat = make_tree(tmp_path)
    bad = cat / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    dm = _datamodule(tmp_path)
    dm.setup()
    index = [Path(p).name for p in dm.train_data.samples.image_path].index("002.png")
    with pytest.raises(ImageReadError) as info:
        dm.train_data[index]
    assert str(bad) in str(info.value)
    assert isinstance(info.value, OSError)
    # The other samples still load.
    assert dm.train_data[(index + 1) % len(dm.train_data)].image.shape[-1] == SIZE


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    cat = make_tree(tmp_path)
    bad = cat / "train" / "good" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    dm = _datamodule(tmp_path)
    dm.setup()
    with pytest.raises(ImageReadError, match=str(bad)):
        list(dm.train_dataloader())


def test_corrupt_mask_names_the_mask(tmp_path: Path) -> None:
    cat = make_tree(tmp_path)
    bad = cat / "ground_truth" / "crack" / "001_mask.png"
    bad.write_bytes(b"garbage")
    dm = _datamodule(tmp_path)
    dm.setup()
    with pytest.raises(ImageReadError) as info:
        list(dm.test_dataloader())
    assert str(bad) in str(info.value)
    assert "mask file" in str(info.value)


def test_corrupt_png_in_dataloader_worker_names_the_file(tmp_path: Path) -> None:
    cat = make_tree(tmp_path)
    bad = cat / "train" / "good" / "003.png"
    bad.write_bytes(b"")
    dm = _datamodule(tmp_path, num_workers=1)
    dm.setup()
    with pytest.raises(ImageReadError) as info:  # re-raised in the main process
        list(dm.train_dataloader())
    assert "DataLoader worker" in str(info.value)
    assert str(bad) in str(info.value)


def test_bad_index_keeps_index_error(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dm = _datamodule(tmp_path)
    dm.setup()
    with pytest.raises(IndexError):
        dm.train_data[100]


def test_category_list_and_layout_check_return_value(tmp_path: Path) -> None:
    from anomalib_moleflow.data import MVTEC_AD_CATEGORIES

    assert len(MVTEC_AD_CATEGORIES) == 15 and "bottle" in MVTEC_AD_CATEGORIES
    cat = make_tree(tmp_path)
    assert check_mvtec_layout(tmp_path, "widget") == cat
    assert check_mvtec_layout(str(tmp_path), "widget", test_split_mode="none") == cat
    assert _datamodule(tmp_path).check_layout() == cat


def test_defect_images_without_masks_need_no_masks_when_not_testing_from_dir(tmp_path: Path) -> None:
    cat = make_tree(tmp_path)
    for mask in (cat / "ground_truth" / "crack").iterdir():
        mask.unlink()
    with pytest.raises(FileNotFoundError, match=r"'crack' has 2 test images .* but 0 masks"):
        check_mvtec_layout(tmp_path, "widget")
    assert check_mvtec_layout(tmp_path, "widget", test_split_mode="synthetic") == cat
