"""MoLE-Flow model folder (anomalib layout): the model owns its experts, routing and per-task state."""

from .config import MoLEFlowConfig
from .inference_batch import RoutedInferenceBatch
from .lightning_model import MoLEFlow
from .torch_model import MoLEFlowModel

__all__ = ["MoLEFlow", "MoLEFlowConfig", "MoLEFlowModel", "RoutedInferenceBatch"]
