"""Lightning callbacks a continual strategy plugs into MoLE-Flow's training (one callback per file).

The model itself fits each expert's per-task statistics (router prototype, scoring statistics,
thresholds) at the end of its training (``MoLEFlow.on_train_end``); callbacks here change *how*
a task trains and call into the model's public methods.
"""

from .gather_training_features import GatherTrainingFeatures
from .ogp import OrthogonalGradientProjection
from .stop_on_request import StopOnRequest

__all__ = ["GatherTrainingFeatures", "OrthogonalGradientProjection", "StopOnRequest"]
