"""The package's layers import only downward::

    io, backbones, data  <-  models  <-  callbacks  <-  continual  <-  cli

Each layer's modules are imported in a fresh interpreter; no module of a higher layer may be
loaded afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, run_python

PACKAGE = REPO / "anomalib_moleflow"
#: Layer of each top-level part of the package (higher imports lower, never the reverse).
LAYERS: dict[str, int] = {
    "_cli_hook": 0,
    "configs_catalog": 0,
    "io": 0,
    "backbones": 1,
    "data": 1,
    "models": 2,
    "callbacks": 3,
    "continual": 4,
    "cli": 5,
    "__main__": 5,
}


def _modules(part: str) -> list[str]:
    base = PACKAGE / part
    if base.is_dir():
        files = sorted(base.rglob("*.py"))
    else:
        files = [PACKAGE / f"{part}.py"]
    names = []
    for path in files:
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert parts - {"__init__"} == set(LAYERS)


@pytest.mark.parametrize("part", sorted(LAYERS, key=LAYERS.get))
def test_layer_imports_only_downward(part: str, tmp_path: Path) -> None:
    higher = [p for p, rank in LAYERS.items() if rank > LAYERS[part]]
    code = (
        "import importlib, json, sys\n"
        f"for name in {_modules(part)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('anomalib_moleflow'))))\n"
    )
    result = run_python(["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    wrong = [m for m in loaded if "." in m and m.split(".")[1] in higher]
    assert wrong == [], f"importing {part} loaded higher layers: {wrong}"


def test_the_package_never_imports_benchmarks_or_tests() -> None:
    for path in PACKAGE.rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in ("benchmarks", "tests", "helpers"), f"{path}: {line}"
