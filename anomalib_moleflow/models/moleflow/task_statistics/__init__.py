"""Per-expert statistics, one mechanism (:class:`TaskStatistics`): the global score, the position
Gaussian, the patch memory and the score thresholds here; the router's prototypes in :mod:`..routing`."""

from .base import TaskStatistics
from .global_score import GlobalScoreFusion
from .patch_memory import PatchMemory
from .position_gaussian import PositionGaussian
from .thresholds import THRESHOLD_NAMES, TaskThresholds

__all__ = ["THRESHOLD_NAMES", "GlobalScoreFusion", "PatchMemory", "PositionGaussian", "TaskStatistics", "TaskThresholds"]
