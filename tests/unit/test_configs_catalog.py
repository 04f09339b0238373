"""Shipped configs: reachable as package data, listed by name, resolved from names or files."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from anomalib_moleflow.configs_catalog import (
    configs_dir,
    description,
    looks_like_name,
    resolve_config,
    shipped_configs,
)

EXPECTED = {
    "moleflow",
    "continual/mvtec15_alphabetical",
    "continual/mvtec15_original",
    "continual/mvtec_real",
    "continual/real_four",
}


def test_configs_are_package_data_reachable_with_importlib_resources() -> None:
    base = files("anomalib_moleflow") / "configs"
    for name in EXPECTED:
        text = base.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        assert isinstance(yaml.safe_load(text), dict), name
    assert Path(str(base)) == configs_dir()


def test_shipped_configs_lists_every_yaml_by_name_with_its_absolute_file() -> None:
    configs = shipped_configs()
    assert set(configs) >= EXPECTED
    assert list(configs) == sorted(configs)
    on_disk = {p.relative_to(configs_dir()).with_suffix("").as_posix() for p in configs_dir().rglob("*.yaml")}
    assert set(configs) == on_disk
    for path in configs.values():
        assert path.is_absolute() and path.is_file()


def test_every_shipped_config_has_a_description() -> None:
    for name, path in shipped_configs().items():
        assert description(path), name
    assert description(shipped_configs()["continual/mvtec_real"]) == (
        "Continual MoLE-Flow on two real MVTec AD categories: bottle, then transistor."
    )


def test_description_is_the_first_sentence_of_the_leading_comment(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("#\n# One stream of two\n# tasks. More text.\n#\n# Other paragraph.\nmodel: {}\n")
    assert description(path) == "One stream of two tasks."
    path.write_text("model: {}  # no leading comment\n")
    assert description(path) == ""


@pytest.mark.parametrize(
    ("value", "name"),
    [("continual/mvtec_real", "continual/mvtec_real"), ("mvtec_real", "continual/mvtec_real"), ("moleflow", "moleflow")],
)
def test_names_resolve_to_the_shipped_file(value: str, name: str) -> None:
    assert resolve_config(value) == shipped_configs()[name]


def test_an_existing_file_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mvtec_real").write_text("model: {}\n")
    assert resolve_config("mvtec_real") == Path("mvtec_real")


def test_unknown_name_is_one_line_listing_the_known_names() -> None:
    with pytest.raises(ValueError, match="'mvtec_rael'") as info:
        resolve_config("mvtec_rael")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in EXPECTED)


def test_a_name_with_a_folder_does_not_fall_back_to_its_last_part() -> None:
    with pytest.raises(ValueError, match="known names"):
        resolve_config("elsewhere/mvtec_real")


def test_ambiguous_short_name_names_the_matches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for sub in ("continual", "ablations"):
        (tmp_path / "configs" / sub).mkdir(parents=True)
        (tmp_path / "configs" / sub / "same.yaml").write_text("# x\n")
    monkeypatch.setattr("anomalib_moleflow.configs_catalog.configs_dir", lambda: tmp_path / "configs")
    with pytest.raises(ValueError, match="ambiguous: it matches ablations/same, continual/same"):
        resolve_config("same")
    assert resolve_config("continual/same") == (tmp_path / "configs" / "continual" / "same.yaml").resolve()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("mvtec_real", True), ("continual/mvtec_real", True), ("my.yaml", False), ("/abs/cfg", False), ("./cfg", False)],
)
def test_looks_like_name(value: str, expected: bool) -> None:
    assert looks_like_name(value) is expected
