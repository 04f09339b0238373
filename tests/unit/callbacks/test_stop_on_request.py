"""Stopping training after the current batch once a stop was requested."""

from __future__ import annotations

from types import SimpleNamespace

from anomalib_moleflow.callbacks import StopOnRequest


def test_should_stop_only_once_requested() -> None:
    requested = [False]
    callback = StopOnRequest(lambda: requested[0])
    trainer = SimpleNamespace(should_stop=False)
    callback.on_train_batch_end(trainer, None, {}, None, 0)
    assert trainer.should_stop is False
    requested[0] = True
    callback.on_train_batch_end(trainer, None, {}, None, 1)
    assert trainer.should_stop is True
