"""The eval output: anomalib's InferenceBatch fields, in order, plus the expert that scored each image."""

from __future__ import annotations

import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_moleflow.models.moleflow import RoutedInferenceBatch


def test_an_inference_batch_with_anomalibs_fields_and_pred_task() -> None:
    assert RoutedInferenceBatch._fields == InferenceBatch._fields
    empty = RoutedInferenceBatch()
    assert isinstance(empty, InferenceBatch)
    assert all(value is None for value in empty) and empty.pred_task is None
    out = RoutedInferenceBatch(pred_score=torch.tensor([0.5]), pred_task=torch.tensor([2]))
    assert out.pred_task.tolist() == [2] and "pred_task=tensor([2])" in repr(out)
    replaced = out._replace(pred_score=torch.tensor([0.75]))
    assert replaced.pred_score.tolist() == [0.75] and replaced.pred_task.tolist() == [2]
    assert out._replace(pred_task=None).pred_task is None


def test_anomalib_batches_take_its_fields() -> None:
    out = RoutedInferenceBatch(
        pred_score=torch.tensor([0.2, 0.9]),
        anomaly_map=torch.rand(2, 1, 8, 8),
        pred_task=torch.tensor([1, -1]),
    )
    batch = ImageBatch(image=torch.rand(2, 3, 8, 8))
    updated = batch.update(**out._asdict())
    assert updated is batch
    assert torch.equal(updated.pred_score, out.pred_score)
    assert updated.anomaly_map.shape == (2, 8, 8)  # anomalib drops the channel axis
    assert getattr(updated, "pred_task", None) is None  # not an anomalib field: ignored, no error
    # anomalib's InferenceBatch reads it positionally, as anomalib code unpacks model outputs
    assert InferenceBatch(*out[:4]).pred_score is out.pred_score


def test_anomalibs_post_processor_accepts_it() -> None:
    out = RoutedInferenceBatch(pred_score=torch.tensor([0.2, 0.9]), anomaly_map=torch.rand(2, 1, 8, 8), pred_task=torch.tensor([0, 1]))
    post = PostProcessor()
    post.eval()
    processed = post(out)
    assert isinstance(processed, InferenceBatch)
    assert processed.pred_label is not None and processed.pred_label.shape == (2,)
    rebuilt = RoutedInferenceBatch.routed(processed, out.pred_task)
    assert torch.equal(rebuilt.pred_task, out.pred_task)
    assert torch.equal(rebuilt.pred_label, processed.pred_label)
