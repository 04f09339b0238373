"""anomalib-moleflow: the MoLE-Flow continual anomaly detection model for anomalib.

Layers, each importing only the layers before it::

    io, backbones, data  <-  models  <-  callbacks  <-  continual  <-  cli

The names below load their layer on first use, so ``import anomalib_moleflow.io`` (or
``.backbones``, ``.data``) loads no model code. Importing :mod:`anomalib_moleflow.models.moleflow`
registers :class:`MoLEFlow` as an ``AnomalibModule`` subclass, which is what lets
``anomalib fit --model MoLEFlow`` find it (the package's ``.pth`` hook does that import lazily
when ``anomalib.cli`` loads).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MoLEFlow": "anomalib_moleflow.models.moleflow",
    "MoLEFlowConfig": "anomalib_moleflow.models.moleflow",
    "MoLEFlowModel": "anomalib_moleflow.models.moleflow",
    "RoutedInferenceBatch": "anomalib_moleflow.models.moleflow",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:  # noqa: ANN401 - the exported classes
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    msg = f"module 'anomalib_moleflow' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
