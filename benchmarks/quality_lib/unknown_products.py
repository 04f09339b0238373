"""Unknown products, measured by leaving one out: a trained continual model with one product's expert
hidden is exactly a model that never learned it (experts are separate; the router's prototypes and
the patch memories are per task). Every test image of every product is routed among the other
products; the unknown score is the winner's routing score over its calibration (the ``memory``
router's "unknown product" test), and the hidden product's images should score high."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

from anomalib_moleflow.continual.metrics import unit_range
from anomalib_moleflow.models.moleflow import MoLEFlowModel
from anomalib_moleflow.models.moleflow.gaussian import pool_features

THRESHOLDS = (1.2, 1.5, 2.0)


@torch.no_grad()
def unknown_ratios(model: MoLEFlowModel, features: torch.Tensor, hidden: int) -> torch.Tensor:
    """Unknown score ``(B,)`` of images with task ``hidden`` left out of the routing."""
    keys = model.task_keys
    distances = model.router.distances(pool_features(features))
    distances[:, hidden] = float("inf")
    k = max(1, min(model.config.routing.router_top_k, len(keys) - 1))
    candidates = distances.topk(k, dim=1, largest=False).indices
    memory = model.patch_memory
    scores = torch.stack([memory.routing_score(key, features) for key in keys], dim=1).double()
    calibration = torch.tensor([memory.routing_calibration(key) for key in keys], dtype=torch.float64)
    chosen_scores = scores.gather(1, candidates)
    best = chosen_scores.argmin(dim=1, keepdim=True)
    chosen = candidates.gather(1, best).squeeze(1)
    return chosen_scores.gather(1, best).squeeze(1) / calibration[chosen]


def leave_one_out(model: MoLEFlowModel, test_features: Sequence[torch.Tensor], names: Sequence[str]) -> list[dict]:
    """Per hidden product: AUROC of the unknown score (its images vs every other product's test
    images, defective ones included) and, per threshold, the share of known images rejected and of
    unknown images caught."""
    rows = []
    for hidden, name in enumerate(names):
        ratios = [unknown_ratios(model, features, hidden) for features in test_features]
        known = torch.cat([r for i, r in enumerate(ratios) if i != hidden])
        unknown = ratios[hidden]
        labels = torch.cat([torch.zeros(len(known)), torch.ones(len(unknown))]).long()
        row = {
            "unknown_product": name,
            "AUROC": float(binary_auroc(unit_range(torch.cat([known, unknown])), labels)),
            "known_images": len(known),
            "unknown_images": len(unknown),
        }
        for threshold in THRESHOLDS:
            row[f"false_rejects@{threshold}"] = float((known > threshold).double().mean())
            row[f"caught@{threshold}"] = float((unknown > threshold).double().mean())
        rows.append(row)
    return rows
