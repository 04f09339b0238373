"""The ``anomalib-moleflow`` command: console script, subcommands, help, one-line errors."""

from __future__ import annotations

import errno

import pytest
import tomllib
from helpers import REPO

from anomalib_moleflow.cli import SUBCOMMANDS, error_line, main


def test_console_script_declared() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["anomalib-moleflow"]
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    assert getattr(module, attr) is main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], ["anomalib-moleflow", "continual"]),
        (
            ["continual", "--help"],
            ["--config", "--data.root", "--data.tasks", "--model.config.experts.lora_rank", "--resume"],
        ),
    ],
)
def test_help(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


def test_missing_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "continual" in capsys.readouterr().err


def test_every_subcommand_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert SUBCOMMANDS and all(name in out for name in SUBCOMMANDS)


def test_error_line_of_a_full_disk_names_the_file_and_the_remedy() -> None:
    line = error_line(OSError(errno.ENOSPC, "No space left on device", "/runs/a/task_00.ckpt"))
    assert "ENOSPC" in line and "/runs/a/task_00.ckpt" in line and "--resume true" in line


def test_error_line_is_one_line() -> None:
    assert error_line(ValueError("first\nsecond")) == "first | second"
