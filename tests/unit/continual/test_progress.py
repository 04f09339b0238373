"""The progress bar over the tasks of a continual run."""

from __future__ import annotations

import pytest
from tqdm.auto import tqdm

from anomalib_moleflow.continual.progress import task_progress


def _open_bars() -> int:
    return len(getattr(tqdm, "_instances", ()))


def test_yields_the_tasks_and_counts_from_the_done_ones(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["bottle", "cable", "transistor"]
    seen = list(task_progress(range(1, 3), names, done=1))
    assert seen == [1, 2]
    err = capsys.readouterr().err
    assert "continual" in err and "1/3" in err and "3/3" in err  # resumed after one task, ends complete
    assert "transistor" in err and "task" in err
    assert _open_bars() == 0


def test_bar_is_closed_when_the_run_stops(capsys: pytest.CaptureFixture[str]) -> None:
    progress = task_progress(range(3), ["a", "b", "c"])
    with pytest.raises(RuntimeError, match="stopped"):
        for task in progress:
            if task == 1:
                raise RuntimeError("stopped")  # noqa: EM101
    progress.close()  # what the for loop's exception leaves to garbage collection, done now
    assert _open_bars() == 0
    err = capsys.readouterr().err
    assert "1/3" in err and "3/3" not in err  # the stopped task was not counted


def test_nothing_left_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(task_progress(range(2, 2), ["a", "b"], done=2)) == []
    assert "2/2" in capsys.readouterr().err
