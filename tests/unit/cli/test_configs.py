"""``anomalib-moleflow configs`` and ``--config NAME`` in ``continual``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anomalib_moleflow.cli import build_parser, main
from anomalib_moleflow.configs_catalog import shipped_configs


def test_list_shows_every_name_with_its_file_and_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name, path in shipped_configs().items():
        assert f"{name}  " in out and str(path) in out
    assert "Continual MoLE-Flow on two real MVTec AD categories" in out


def test_path_prints_only_the_absolute_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "--path", "moleflow"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == str(shipped_configs()["moleflow"])
    assert out.count("\n") == 1 and Path(out.strip()).is_absolute()


def test_show_prints_the_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "--show", "mvtec_real"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["tasks"] == ["bottle", "transistor"]


def test_unknown_name_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "--path", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("anomalib-moleflow configs: error: ") and "'nope'" in err and "moleflow" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["mvtec_real", "continual/mvtec_real"])
def test_continual_config_by_name(value: str) -> None:
    cfg = build_parser().parse_args(["continual", "--config", value])
    assert cfg.continual.data.tasks == ["bottle", "transistor"]
    assert cfg.continual.run.output_dir == "results/continual/mvtec_real"


def test_continual_config_file_of_that_name_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("mvtec_real").write_text(yaml.safe_dump({"data": {"tasks": ["screw"]}}))
    cfg = build_parser().parse_args(["continual", "--config", "mvtec_real"])
    assert cfg.continual.data.tasks == ["screw"]


def test_continual_unknown_config_name_lists_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["continual", "--config", "mvtec_rael"]) == 2
    err = capsys.readouterr().err
    assert "'mvtec_rael'" in err and "continual/mvtec_real" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_continual_yaml_string_still_works() -> None:
    cfg = build_parser().parse_args(["continual", "--config", "{data: {tasks: [cable]}}"])
    assert cfg.continual.data.tasks == ["cable"]
