"""Tests of the lazy ``.pth`` hook that registers MoLEFlow with anomalib's CLI.

The mechanism is tested in child interpreters started with ``-S`` (no
site-packages) on a throw-away site folder holding the real ``.pth`` file, the
real ``_cli_hook.py``, the real (lazy) top-level ``anomalib_moleflow/__init__.py``
and small stand-ins for ``anomalib`` and the two modules the hook imports
(``anomalib_moleflow.models.moleflow`` and ``anomalib_moleflow.data``): fast, and
independent of what is installed. The last tests check the installed package for
real (they skip when the package is not installed with its ``.pth``, e.g. when run
from a bare checkout).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, run_python

from anomalib_moleflow import _cli_hook

PTH_NAME = "anomalib_moleflow_cli_hook.pth"
PTH = REPO / PTH_NAME
HOOK = REPO / "anomalib_moleflow" / "_cli_hook.py"
PACKAGE_INIT = REPO / "anomalib_moleflow" / "__init__.py"

#: Stand-in for ``anomalib_moleflow.models.moleflow`` (defines and so registers ``MoLEFlow``).
FAKE_PLUGIN = """
import sys
cli = sys.modules["anomalib.cli.cli"]
assert cli.LOADED, "plugin imported before anomalib.cli.cli finished"
cli.REGISTERED.append("MoLEFlow")
"""
#: Stand-in for ``anomalib_moleflow.data`` (defines and so registers ``MVTecADLocal``).
FAKE_DATA = """
import sys
cli = sys.modules["anomalib.cli.cli"]
assert "anomalib_moleflow.models.moleflow" in sys.modules, "data imported before the model"
cli.REGISTERED.append("MVTecADLocal")
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ANOMALIB_MOLEFLOW_NO_CLI_HOOK"}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def make_site(
    tmp_path: Path, plugin: str | None = FAKE_PLUGIN, hook: str | None = None, data: str = FAKE_DATA
) -> Path:
    """A site folder with the real .pth, hook and package ``__init__``, a fake anomalib and fake
    plugin modules (``plugin=None``: no package at all, as after an uninstall)."""
    site_dir = tmp_path / "site"
    (site_dir / "anomalib" / "cli").mkdir(parents=True)
    shutil.copy(PTH, site_dir / PTH_NAME)
    (site_dir / "anomalib" / "__init__.py").write_text("")
    (site_dir / "anomalib" / "cli" / "__init__.py").write_text("from .cli import main\n")
    (site_dir / "anomalib" / "cli" / "cli.py").write_text(
        textwrap.dedent(
            """
            import sys
            REGISTERED = []
            def main():
                print("main sees", REGISTERED, "anomalib_moleflow.models.moleflow" in sys.modules)
            LOADED = True
            """,
        ),
    )
    if plugin is not None:
        package = site_dir / "anomalib_moleflow"
        (package / "models" / "moleflow").mkdir(parents=True)
        (package / "data").mkdir()
        shutil.copy(PACKAGE_INIT, package / "__init__.py")
        (package / "models" / "__init__.py").write_text("")
        (package / "models" / "moleflow" / "__init__.py").write_text(plugin)
        (package / "data" / "__init__.py").write_text(data)
        if hook is None:
            shutil.copy(HOOK, site_dir / "anomalib_moleflow" / "_cli_hook.py")
        else:
            (site_dir / "anomalib_moleflow" / "_cli_hook.py").write_text(hook)
    return site_dir


def run_child(site_dir: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in ``python -S`` after ``site.addsitedir(site_dir)`` (which reads the .pth)."""
    prologue = f"import site, sys\nsite.addsitedir({str(site_dir)!r})\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", prologue + textwrap.dedent(code)],
        cwd=site_dir.parent,  # not the repository: '' on sys.path must not find the real package
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=120,
        check=False,
    )


def test_pth_file_has_exactly_one_import_line() -> None:
    lines = [line for line in PTH.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1
    assert lines[0].startswith("import ")  # site.py executes only lines starting with "import"


def test_hook_module_imports_only_os_sys_warnings() -> None:
    """The hook runs at every Python start: it may use only modules loaded anyway."""
    imported = set()
    for node in ast.walk(ast.parse(HOOK.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"os", "sys", "warnings"}, imported


def test_hook_is_lazy_and_fires_after_anomalib_cli(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path)
    result = run_child(
        site_dir,
        """
        before = set(sys.modules)
        import anomalib
        assert "anomalib_moleflow" not in sys.modules, "imported too early"
        import anomalib.cli
        assert {"anomalib_moleflow.models.moleflow", "anomalib_moleflow.data"} <= set(sys.modules)
        assert anomalib.cli.cli.REGISTERED == ["MoLEFlow", "MVTecADLocal"]
        # The hook removed itself and left the real loader in place.
        assert not any(type(f).__name__ == "_CliHookFinder" for f in sys.meta_path)
        assert type(anomalib.cli.__loader__).__name__ == "SourceFileLoader"
        assert type(anomalib.cli.__spec__.loader).__name__ == "SourceFileLoader"
        print("OK")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
    assert result.stderr == ""


def test_hook_loads_no_module_at_start_but_itself(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path)
    prologue = "import site, sys\nbefore = set(sys.modules)\n"
    code = f"site.addsitedir({str(site_dir)!r})\nprint(sorted(set(sys.modules) - before))\n"
    result = subprocess.run(
        [sys.executable, "-S", "-c", prologue + code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['_anomalib_moleflow_cli_hook']"


def test_console_script_import_path(tmp_path: Path) -> None:
    """``anomalib = anomalib.cli.cli:main`` imports the submodule directly."""
    site_dir = make_site(tmp_path)
    result = run_child(site_dir, "from anomalib.cli.cli import main\nmain()\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "main sees ['MoLEFlow', 'MVTecADLocal'] True"


def test_broken_plugin_only_warns(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, plugin="raise ImportError('boom from the plugin')\n")
    result = run_child(site_dir, "from anomalib.cli.cli import main\nmain()\n")
    assert result.returncode == 0, result.stderr
    assert "main sees [] False" in result.stdout
    assert "RuntimeWarning" in result.stderr
    assert "boom from the plugin" in result.stderr
    assert "'anomalib_moleflow.models.moleflow'" in result.stderr  # names the module that failed
    assert "anomalib_moleflow.MoLEFlow" in result.stderr  # tells the user what to try


def test_broken_data_module_only_warns(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, data="raise RuntimeError('boom from the data module')\n")
    result = run_child(site_dir, "from anomalib.cli.cli import main\nmain()\n")
    assert result.returncode == 0, result.stderr
    assert "main sees ['MoLEFlow'] True" in result.stdout  # the model still registered
    assert "boom from the data module" in result.stderr and "'anomalib_moleflow.data'" in result.stderr


@pytest.mark.parametrize(
    "broken_hook",
    ["raise RuntimeError('hook exploded')\n", "def broken(:\n", "install = None\n"],
    ids=["raises", "syntax-error", "not-callable"],
)
def test_broken_hook_never_breaks_python_start(tmp_path: Path, broken_hook: str) -> None:
    site_dir = make_site(tmp_path, hook=broken_hook)
    result = run_child(site_dir, "import anomalib.cli\nprint('still alive')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "still alive"
    assert "anomalib-moleflow: CLI hook not installed" in result.stderr


def test_uninstalled_package_is_silent(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, plugin=None)  # .pth left behind, package gone
    result = run_child(site_dir, "import anomalib.cli\nprint('fine')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fine"
    assert result.stderr == ""


def test_env_var_switches_the_hook_off(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path)
    result = run_child(
        site_dir,
        "import anomalib.cli\nprint('anomalib_moleflow' in sys.modules)\n",
        ANOMALIB_MOLEFLOW_NO_CLI_HOOK="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_install_is_idempotent_and_registers_late(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path)
    result = run_child(
        site_dir,
        """
        hook = sys.modules["_anomalib_moleflow_cli_hook"]
        hook.install(); hook.install()
        assert sum(type(f).__name__ == "_CliHookFinder" for f in sys.meta_path) == 1
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_CliHookFinder"]
        import anomalib.cli                      # imported while no hook was active
        assert "anomalib_moleflow" not in sys.modules
        hook.install()                           # then registers at once
        assert anomalib.cli.cli.REGISTERED == ["MoLEFlow", "MVTecADLocal"]
        print("OK")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_plugin_modules_define_what_they_register() -> None:
    """The modules the hook imports are the ones that define MoLEFlow and MVTecADLocal."""
    import importlib

    import anomalib_moleflow

    assert _cli_hook.PLUGIN_MODULES == ("anomalib_moleflow.models.moleflow", "anomalib_moleflow.data")
    assert _cli_hook.TRIGGER_MODULE == "anomalib.cli" and _cli_hook.DISABLE_ENV == "ANOMALIB_MOLEFLOW_NO_CLI_HOOK"
    model_module, data_module = (importlib.import_module(name) for name in _cli_hook.PLUGIN_MODULES)
    assert model_module.MoLEFlow is anomalib_moleflow.MoLEFlow
    assert data_module.MVTecADLocal.__name__ == "MVTecADLocal"


def test_top_level_package_is_lazy(tmp_path: Path) -> None:
    """``import anomalib_moleflow`` loads no torch, anomalib or model code; the exported names load
    their layer on first use; an unknown name is an AttributeError naming it."""
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {repo!r})
        import anomalib_moleflow
        heavy = [m for m in ("torch", "anomalib", "anomalib_moleflow.models") if m in sys.modules]
        assert not heavy, heavy
        assert "MoLEFlow" in dir(anomalib_moleflow) and anomalib_moleflow.__version__ == "0.1.0"
        import anomalib_moleflow.io, anomalib_moleflow.backbones, anomalib_moleflow.data
        assert "anomalib_moleflow.models" not in sys.modules  # the bottom layers load no model code
        cls = anomalib_moleflow.MoLEFlow
        from anomalib_moleflow.models.moleflow import MoLEFlow
        assert cls is MoLEFlow and anomalib_moleflow.RoutedInferenceBatch.__name__ == "RoutedInferenceBatch"
        try:
            anomalib_moleflow.NoSuchThing
        except AttributeError as exc:
            assert "'NoSuchThing'" in str(exc), exc
        else:
            raise AssertionError("no AttributeError")
        print("OK")
        """
    ).format(repo=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        env=_env(ANOMALIB_MOLEFLOW_NO_CLI_HOOK="1"), timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


# --- the installed package, for real ------------------------------------------------


def _installed_hook_active() -> bool:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; print('_anomalib_moleflow_cli_hook' in sys.modules)"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    return result.stdout.strip() == "True"


needs_installed_hook = pytest.mark.skipif(
    not _installed_hook_active(),
    reason="anomalib-moleflow is not installed with its .pth hook here (run `pip install -e .`)",
)


@needs_installed_hook
def test_installed_hook_is_lazy_and_registers_moleflow() -> None:
    code = textwrap.dedent(
        """
        import sys
        heavy = [m for m in ("torch", "anomalib", "anomalib_moleflow") if m in sys.modules]
        assert not heavy, f"imported at start-up: {heavy}"
        import anomalib.cli
        from anomalib.models.components import AnomalibModule
        def subclasses(cls):
            for sub in cls.__subclasses__():
                yield sub
                yield from subclasses(sub)
        names = {c.__module__.split(".")[0] + ":" + c.__name__ for c in subclasses(AnomalibModule)}
        assert "anomalib_moleflow:MoLEFlow" in names, sorted(names)
        from anomalib.data import AnomalibDataModule
        names = {c.__module__.split(".")[0] + ":" + c.__name__ for c in subclasses(AnomalibDataModule)}
        assert "anomalib_moleflow:MVTecADLocal" in names, sorted(names)
        print("OK")
        """,
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def _anomalib_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run anomalib's console-script entry point (``anomalib.cli.cli:main``) in this interpreter."""
    code = "import sys; from anomalib.cli.cli import main; sys.argv[0] = 'anomalib'; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=600,
        check=False,
    )


@needs_installed_hook
def test_anomalib_cli_finds_model_by_short_name() -> None:
    result = _anomalib_cli("fit", "--model", "MoLEFlow", "--data", "MVTecADLocal", "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: anomalib_moleflow.MoLEFlow" in result.stdout
    assert "class_path: anomalib_moleflow.data.MVTecADLocal" in result.stdout


def test_config_file_parses(tmp_path: Path) -> None:
    """The shipped ``moleflow`` config is valid for `anomalib fit` (class paths work without the hook),
    found as the README says, outside a clone: ``--config $(anomalib-moleflow configs --path moleflow)``."""
    found = run_python(["-m", "anomalib_moleflow", "configs", "--path", "moleflow"], cwd=tmp_path)
    assert found.returncode == 0, found.stderr[-3000:]
    config = Path(found.stdout.strip())
    assert config.is_absolute() and config.is_file() and config.parts[-2:] == ("configs", "moleflow.yaml")
    code = (
        "import sys; sys.path.insert(0, {repo!r}); from anomalib.cli.cli import main; "
        "sys.argv[0] = 'anomalib'; sys.exit(main())"
    ).format(repo=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", code, "fit", "--config", str(config), "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "class_path: anomalib_moleflow.MoLEFlow" in out
    assert "class_path: anomalib_moleflow.data.MVTecADLocal" in out
    assert "root: ../shared/data/mvtec_ad" in out
    assert "max_epochs: 8" in out
