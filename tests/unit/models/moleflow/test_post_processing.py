"""The post-processor of a model that normalises its scores per task."""

from __future__ import annotations

import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_moleflow.models.moleflow.post_processing import (
    NormalizedScorePostProcessor,
    normalized_score_post_processor,
)

NAMES = ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")


def _post_values(post: PostProcessor) -> list[float]:
    return [float(getattr(post, n)) for n in NAMES]


def test_thresholds_at_half_and_values_passed_through() -> None:
    post = normalized_score_post_processor()
    assert isinstance(post, NormalizedScorePostProcessor)
    assert _post_values(post) == [0.5, 0.5, 0.0, 1.0, 0.0, 1.0]
    scores = torch.tensor([0.0, 0.3, 0.5, 0.51, 1.0])
    maps = scores[:, None, None, None].expand(-1, 1, 2, 2)
    out = post(InferenceBatch(pred_score=scores, anomaly_map=maps))
    assert torch.equal(out.pred_score, scores)
    assert torch.equal(out.anomaly_map, maps)
    assert out.pred_label.tolist() == [False, False, False, True, True]  # anomalib thresholds with '>'


def test_normalized_post_processor_ignores_validation_outputs() -> None:
    """anomalib's post-processor recalibrates itself on validation outputs; the pass-through one must
    not (its validation outputs are raw scores, the thresholds come at the end of the fit)."""
    post = normalized_score_post_processor()
    batch = ImageBatch(image=torch.rand(2, 3, 4, 4), gt_label=torch.tensor([0, 1]), pred_score=torch.tensor([10.0, 900.0]))
    post.on_validation_batch_end(None, None, batch)
    post.on_validation_epoch_end(None, None)
    assert _post_values(post) == [0.5, 0.5, 0.0, 1.0, 0.0, 1.0]
    plain = PostProcessor()  # what it guards against
    plain.on_validation_batch_end(None, None, batch)
    plain.on_validation_epoch_end(None, None)
    assert float(plain.image_max) == 900.0
