"""Lazy registration of ``MoLEFlow`` with anomalib's command line.

anomalib resolves ``anomalib fit --model NAME`` among the ``AnomalibModule``
subclasses that are *already imported* (jsonargparse subclass lookup), and it
has no plugin entry point for models. To make ``--model MoLEFlow`` work right
after ``pip install``, the distribution ships ``anomalib_moleflow_cli_hook.pth``
into site-packages. Python runs its single ``import`` line at every start; that
line loads this file (by path, *without* importing the heavy
``anomalib_moleflow`` package) and calls :func:`install`.

:func:`install` only puts a small finder first in :data:`sys.meta_path`. The finder
does nothing until the module ``anomalib.cli`` is imported (the ``anomalib``
console script does that first thing). Then it lets the real loader execute
``anomalib.cli`` and, right after, imports ``anomalib_moleflow.models.moleflow`` and
``anomalib_moleflow.data``, which define (and thereby register) ``MoLEFlow`` and
``MVTecADLocal`` (so ``--data MVTecADLocal`` works too). The finder then
removes itself. Every other Python program pays only for loading this file
(under a millisecond with its cached bytecode).

Rules kept here on purpose:

* only ``os`` and ``sys`` (both loaded at every start anyway); no torch, no
  anomalib, not even ``importlib.util`` (3 ms) or ``from __future__``;
* never break an unrelated Python start: every failure is caught and at most
  turned into a warning;
* set ``ANOMALIB_MOLEFLOW_NO_CLI_HOOK=1`` to switch the hook off.
"""

import os
import sys

__all__ = ["DISABLE_ENV", "PLUGIN_MODULES", "TRIGGER_MODULE", "install", "register_now"]

#: The module whose import triggers the registration. ``anomalib.cli.cli`` (the
#: console script's module) is always imported through its package
#: ``anomalib.cli``, and the package's ``__init__`` imports ``.cli`` itself, so
#: hooking the package alone covers both ``import anomalib.cli`` and the
#: ``anomalib`` console script, and fires once the whole CLI module is loaded.
TRIGGER_MODULE = "anomalib.cli"
#: The modules imported to register the model class (``--model MoLEFlow``) and the
#: datamodule (``--data MVTecADLocal``).
PLUGIN_MODULES = ("anomalib_moleflow.models.moleflow", "anomalib_moleflow.data")
#: Environment variable that switches the hook off when set to a true value.
DISABLE_ENV = "ANOMALIB_MOLEFLOW_NO_CLI_HOOK"


def _warn(message: str) -> None:
    try:
        import warnings

        warnings.warn(f"anomalib-moleflow: {message}", RuntimeWarning, stacklevel=2)
    except Exception:  # noqa: BLE001 - a warning must never become an error
        pass


def register_now() -> bool:
    """Import the plugin so that ``MoLEFlow`` is known to anomalib's CLI.

    Returns ``True`` on success. Failures are reported as a warning, never
    raised: a broken plugin must not stop ``anomalib`` from working for its
    own models (``--model anomalib_moleflow.MoLEFlow`` then shows the real
    error).
    """
    for name in PLUGIN_MODULES:
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001
            _warn(
                f"could not import {name!r} to register MoLEFlow / MVTecADLocal with the anomalib CLI "
                f"({type(exc).__name__}: {exc}). Short names will not be found; the full class path "
                f"(e.g. '--model anomalib_moleflow.MoLEFlow') shows the full error.",
            )
            return False
    return True


class _RegisteringLoader:
    """Wraps the real loader of ``anomalib.cli``; registers the plugin after it ran."""

    def __init__(self, loader: object, finder: "_CliHookFinder") -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):  # noqa: ANN001, ANN201
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:  # noqa: ANN001
        # Restore the real loader on the module so that introspection
        # (inspect.getsource, importlib.reload, resources) sees nothing of us.
        try:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        except Exception:  # noqa: BLE001, S110
            pass
        self._loader.exec_module(module)  # errors of anomalib itself propagate unchanged
        self._finder.fire()

    def __getattr__(self, name: str):  # noqa: ANN204 - delegate get_source, is_package, ...
        return getattr(self._loader, name)


class _CliHookFinder:
    """A ``sys.meta_path`` finder that only ever reacts to ``anomalib.cli``."""

    # Marker so that install() can recognise a finder from another copy of this file.
    _anomalib_moleflow_cli_hook = True

    def __init__(self) -> None:
        self._busy = False
        self._fired = False

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname != TRIGGER_MODULE or self._busy or self._fired:
            return None
        try:
            self._busy = True
            spec = None
            for finder in sys.meta_path:
                if finder is self or getattr(finder, "_anomalib_moleflow_cli_hook", False):
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return None  # let the normal machinery report / handle it
            spec.loader = _RegisteringLoader(spec.loader, self)
            return spec
        except Exception as exc:  # noqa: BLE001
            _warn(f"CLI hook could not wrap {fullname!r} ({type(exc).__name__}: {exc})")
            return None
        finally:
            self._busy = False

    def fire(self) -> None:
        if self._fired:
            return
        self._fired = True
        self.uninstall()
        register_now()

    def uninstall(self) -> None:
        try:
            while self in sys.meta_path:
                sys.meta_path.remove(self)
        except Exception:  # noqa: BLE001, S110
            pass


def install() -> None:
    """Install the lazy hook (idempotent, never raises).

    If ``anomalib.cli`` is already imported, the plugin is registered at once.
    """
    try:
        if os.environ.get(DISABLE_ENV, "").strip().lower() not in {"", "0", "false", "no"}:
            return
        if TRIGGER_MODULE in sys.modules:
            register_now()
            return
        if any(getattr(f, "_anomalib_moleflow_cli_hook", False) for f in sys.meta_path):
            return
        # First in line, so it sees the request before the path finder does.
        # For every other name it returns None at once; for anomalib.cli it
        # asks the other finders itself and only wraps the loader they return,
        # so editable-install finders and coverage hooks keep working.
        sys.meta_path.insert(0, _CliHookFinder())
    except Exception as exc:  # noqa: BLE001
        _warn(f"could not install the CLI hook ({type(exc).__name__}: {exc})")
