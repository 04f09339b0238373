"""Models provided by anomalib-moleflow."""

from .moleflow import MoLEFlow, MoLEFlowConfig, MoLEFlowModel, RoutedInferenceBatch

__all__ = ["MoLEFlow", "MoLEFlowConfig", "MoLEFlowModel", "RoutedInferenceBatch"]
