"""The YAML configs shipped inside the package (``anomalib_moleflow/configs/``), by name.

A config's name is its path under that folder without ``.yaml``: ``moleflow``,
``continual/mvtec_real``, ``ablations/<name>``. A name may be shortened to its last part when
that is unique (``mvtec_real``). The files are package data, so they are there after a plain
``pip install`` (no clone needed)::

    anomalib-moleflow configs                       # list them
    anomalib train --config $(anomalib-moleflow configs --path moleflow)
    anomalib-moleflow continual --config mvtec_real
"""

from __future__ import annotations

import os
import re
from importlib.resources import files
from pathlib import Path

SUFFIXES = (".yaml", ".yml")


def configs_dir() -> Path:
    """Folder of the shipped configs (``<site-packages>/anomalib_moleflow/configs``)."""
    return Path(str(files("anomalib_moleflow") / "configs"))


def shipped_configs() -> dict[str, Path]:
    """Name -> absolute path of every shipped config, sorted by name."""
    root = configs_dir()
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in SUFFIXES:
            found[path.relative_to(root).with_suffix("").as_posix()] = path.resolve()
    return dict(sorted(found.items()))


def description(path: Path) -> str:
    """First sentence of the file's leading comment (empty when it has none)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            if lines:
                break
            continue
        lines.append(text)
    first = re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0]
    return first.rstrip(":").strip()


def _matches(value: str, names: list[str]) -> list[str]:
    if value in names:
        return [value]
    if "/" in value:
        return []
    return [n for n in names if n.rsplit("/", 1)[-1] == value]


def looks_like_name(value: str) -> bool:
    """``value`` is written as a config name (``mvtec_real``, ``continual/mvtec_real``), not as a file path."""
    return not (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or Path(value).suffix in (*SUFFIXES, ".json")
        or "\\" in value
    )


def resolve_config(value: str) -> Path:
    """Path of config ``value``: an existing file as given, else the shipped config of that name.

    Raises:
        ValueError: one line naming ``value`` and listing the known names, when it is neither.
    """
    if os.path.isfile(value):
        return Path(value)
    configs = shipped_configs()
    matches = _matches(value, list(configs))
    if len(matches) == 1:
        return configs[matches[0]]
    known = ", ".join(configs)
    if matches:
        msg = f"config name '{value}' is ambiguous: it matches {', '.join(matches)}; give the full name"
    else:
        msg = f"no config file or shipped config named '{value}'; known names: {known}"
    raise ValueError(msg)


__all__ = ["configs_dir", "description", "looks_like_name", "resolve_config", "shipped_configs"]
