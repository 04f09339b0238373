"""tests/ mirrors the package: every module ``anomalib_moleflow/<path>/<name>.py`` has its test file
``tests/unit/<path>/test_<name>.py`` (``__init__`` and ``__main__`` files aside); a module's tests
may be split by topic into ``test_<name>_<topic>.py`` beside it."""

from __future__ import annotations

from helpers import REPO

PACKAGE = REPO / "anomalib_moleflow"
UNIT = REPO / "tests" / "unit"


def test_every_module_has_a_test_file() -> None:
    missing = []
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name in ("__init__.py", "__main__.py"):
            continue
        relative = module.relative_to(PACKAGE)
        expected = UNIT / relative.parent / f"test_{module.stem.lstrip('_')}.py"
        if not expected.is_file():
            missing.append(f"{relative} -> {expected.relative_to(REPO)}")
    assert missing == [], "modules without a test file:\n" + "\n".join(missing)


def test_no_test_file_without_its_module() -> None:
    orphans = []
    for test in sorted(UNIT.rglob("test_*.py")):
        relative = test.relative_to(UNIT)
        stem = test.stem[len("test_") :]
        prefixes = ["_".join(stem.split("_")[:n]) for n in range(1, stem.count("_") + 2)]  # name, or name_topic
        candidates = [PACKAGE / relative.parent / f"{p}{s}.py" for s in prefixes for p in ("", "_")]
        if not any(c.is_file() for c in candidates):
            orphans.append(str(test.relative_to(REPO)))
    assert orphans == [], "unit test files whose module does not exist:\n" + "\n".join(orphans)
