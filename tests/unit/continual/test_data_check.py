"""Every file of a task stream checked before training; every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_moleflow.continual import TaskStream
from anomalib_moleflow.continual.data_check import check_stream_files
from anomalib_moleflow.data.synthetic import make_task


def _stream(root: Path) -> TaskStream:
    return TaskStream(["widget"], root=str(root), num_workers=0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_task(tmp_path, "widget", style="red_stripes", n_train=4, n_good=2, n_defect=2, defect_name="defect")
    return tmp_path


def test_good_data_passes(root: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_stream_files(_stream(root))


def test_every_bad_file_is_named_in_one_message(root: Path) -> None:
    train = sorted((root / "widget" / "train" / "good").glob("*.png"))
    train[0].write_bytes(b"not a png")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(train[1])
    mask = sorted((root / "widget" / "ground_truth" / "defect").glob("*.png"))[0]
    Image.open(mask).resize((16, 16)).save(mask)
    with pytest.raises(ValueError, match="3 bad file") as info:
        check_stream_files(_stream(root))
    message = str(info.value)
    assert "\n" not in message
    assert f"'{train[0]}' cannot be decoded" in message
    assert f"'{train[1]}' is a I;16" in message and "16-bit" in message
    assert f"mask '{mask}' is 16x16 but its image" in message


def test_constant_training_images_warn(root: Path) -> None:
    for path in (root / "widget" / "train" / "good").glob("*.png"):
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    with pytest.warns(UserWarning, match=r"task 'widget': its 4 training images are \(nearly\) constant"):
        check_stream_files(_stream(root))


def test_images_of_several_sizes_warn(root: Path) -> None:
    train = sorted((root / "widget" / "train" / "good").glob("*.png"))
    Image.open(train[0]).resize((96, 64)).save(train[0])
    with pytest.warns(UserWarning, match=r"task 'widget': its images come in 2 sizes \(64x64, 96x64\)"):
        check_stream_files(_stream(root))
