"""MoLE-Flow model folder (anomalib layout)."""

from .config import MoLEFlowConfig
from .lightning_model import MoLEFlow
from .torch_model import MoLEFlowModel

__all__ = ["MoLEFlow", "MoLEFlowConfig", "MoLEFlowModel"]
