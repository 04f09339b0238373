"""Models provided by anomalib-moleflow."""

from .moleflow import MoLEFlow, MoLEFlowConfig, MoLEFlowModel

__all__ = ["MoLEFlow", "MoLEFlowConfig", "MoLEFlowModel"]
