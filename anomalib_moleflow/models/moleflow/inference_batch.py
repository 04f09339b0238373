"""The eval output of MoLE-Flow: anomalib's four fields plus the expert that scored each image."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutedInferenceBatch(NamedTuple):
    """anomalib's ``InferenceBatch`` fields plus ``pred_task``.

    Same field names and order as :class:`anomalib.data.InferenceBatch` (so anomalib's
    post-processor and ``batch.update(**out._asdict())`` read it unchanged), then:

    Args:
        pred_task: Index of the expert that scored each image ``(B,)`` (a position in
            ``MoLEFlowModel.task_keys``; ``-1``: unknown product, scored as fully anomalous).
    """

    pred_score: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    anomaly_map: torch.Tensor | None = None
    pred_mask: torch.Tensor | None = None
    pred_task: torch.Tensor | None = None
