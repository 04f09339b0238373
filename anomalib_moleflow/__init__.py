"""anomalib-moleflow: the MoLE-Flow continual anomaly detection model for anomalib.

Importing this package registers :class:`MoLEFlow` as an ``AnomalibModule`` subclass, which
is what lets ``anomalib fit --model MoLEFlow`` find it (the package's ``.pth`` hook does
the import lazily when ``anomalib.cli`` loads).
"""

from .models.moleflow import MoLEFlow, MoLEFlowConfig, MoLEFlowModel

__version__ = "0.1.0"
__all__ = ["MoLEFlow", "MoLEFlowConfig", "MoLEFlowModel", "__version__"]
