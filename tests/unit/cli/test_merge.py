"""``anomalib-moleflow merge``: its arguments and one-line errors (a merge compared with the
sequential run: ``tests/integration/test_grow_and_merge.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_moleflow.cli import build_parser, main


def test_arguments() -> None:
    cfg = build_parser().parse_args(["merge", "--base", "b", "--parts", "p1", "p2", "--output", "m"])["merge"]
    assert (cfg.base, cfg.parts, cfg.output, cfg.resume, cfg.data.num_workers) == ("b", ["p1", "p2"], "m", False, None)


def test_missing_base_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_base"
    assert main(["merge", "--base", str(missing), "--parts", str(tmp_path), "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("anomalib-moleflow merge: error: ") and str(missing) in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_parts_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", "--base", "b", "--output", "m"]) == 2
    assert "parts" in capsys.readouterr().err
