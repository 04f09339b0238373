"""The eval output of MoLE-Flow: anomalib's ``InferenceBatch`` plus the expert that scored each image."""

from __future__ import annotations

import torch
from anomalib.data import InferenceBatch


class RoutedInferenceBatch(InferenceBatch):
    """An :class:`anomalib.data.InferenceBatch` that also carries ``pred_task``.

    Its tuple fields are exactly anomalib's four (``pred_score``, ``pred_label``, ``anomaly_map``,
    ``pred_mask``), so anomalib's post-processor, ``batch.update(**out._asdict())``, its
    inferencers and exporters read it unchanged; ``pred_task`` rides along as an attribute.

    Args:
        pred_task: Index of the expert that scored each image ``(B,)`` (a position in
            ``MoLEFlowModel.task_keys``; ``-1``: unknown product, scored as fully anomalous).
    """

    pred_task: torch.Tensor | None = None

    def __new__(
        cls,
        pred_score: torch.Tensor | None = None,
        pred_label: torch.Tensor | None = None,
        anomaly_map: torch.Tensor | None = None,
        pred_mask: torch.Tensor | None = None,
        pred_task: torch.Tensor | None = None,
    ) -> RoutedInferenceBatch:
        batch = super().__new__(cls, pred_score, pred_label, anomaly_map, pred_mask)
        batch.pred_task = pred_task
        return batch

    @classmethod
    def routed(cls, batch: InferenceBatch, pred_task: torch.Tensor | None) -> RoutedInferenceBatch:
        """``batch``'s four fields (e.g. a post-processor's output) with ``pred_task`` attached."""
        return cls(*batch, pred_task=pred_task)

    def _replace(self, **changes: torch.Tensor | None) -> RoutedInferenceBatch:
        pred_task = changes.pop("pred_task", self.pred_task)
        return type(self)(*super()._replace(**changes), pred_task=pred_task)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, pred_task={self.pred_task!r})"
