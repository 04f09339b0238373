"""Checked checkpoint loading: ``weights_only``, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_moleflow.io import CheckpointError, atomic_torch_save, safe_torch_load


class _NotPlainData:
    """An arbitrary object: ``weights_only`` loading refuses to unpickle it."""

    def __init__(self) -> None:
        self.x = 1


def test_loads_plain_data_on_the_cpu(tmp_path: Path) -> None:
    path = atomic_torch_save({"w": torch.arange(4.0), "meta": {"a": [1, None]}}, tmp_path / "ok.pt")
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["w"].device.type == "cpu"
    assert loaded["meta"] == {"a": [1, None]}
    assert safe_torch_load(str(path)).keys() == loaded.keys()  # a str path works too


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*does not exist"):
        safe_torch_load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="not a file") as info:
        safe_torch_load(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_named(tmp_path: Path, damage: str) -> None:
    path = atomic_torch_save({"weights": torch.randn(1000)}, tmp_path / "task_01_transistor.pt")
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10, "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match=r"task_01_transistor\.pt.*truncated or corrupt") as info:
        safe_torch_load(path)
    assert f"({len(damaged[damage])} bytes)" in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError see it too


def test_code_is_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": _NotPlainData()}, pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.pt"):
        safe_torch_load(pickled)


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError, match=r"tensor\.pt' holds a Tensor, not a checkpoint dict"):
        safe_torch_load(path)


def test_any_dict_loads(tmp_path: Path) -> None:
    """No format check here: that is the caller's (e.g. the continual run checkpoint's) job."""
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert safe_torch_load(foreign) == {"state_dict": {}}


def test_refusal_names_the_global_it_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": _NotPlainData()}, pickled)
    with pytest.raises(CheckpointError, match=r"Unsupported global: GLOBAL .*_NotPlainData") as info:
        safe_torch_load(pickled)
    assert "\n" not in str(info.value)
