"""Under DDP every process ends a task with the training features of all processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from anomalib_moleflow.callbacks import GatherTrainingFeatures
from anomalib_moleflow.callbacks import gather_training_features as module
from anomalib_moleflow.models.moleflow.feature_cache import FeatureCache


def _module(paths: list[str], cache_features: bool = True) -> SimpleNamespace:
    cache = FeatureCache()
    cache.replace_training([(p, torch.full((2,), float(i))) for i, p in enumerate(paths)])
    config = SimpleNamespace(features=SimpleNamespace(cache_features=cache_features))
    return SimpleNamespace(feature_cache=cache, config=config)


def test_one_process_keeps_its_cache() -> None:
    pl_module = _module(["a", "b"])
    GatherTrainingFeatures().on_train_end(SimpleNamespace(world_size=1), pl_module)
    assert [p for p, _ in pl_module.feature_cache.training_items()] == ["a", "b"]


def test_shares_of_every_process_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    other = [("c", torch.ones(2)), ("a", torch.zeros(2))]  # rank 1's share; "a" padded in by the sampler

    def all_gather_object(shares: list, mine: list) -> None:
        shares[0], shares[1] = mine, other

    monkeypatch.setattr(module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(module.dist, "all_gather_object", all_gather_object)
    pl_module = _module(["a", "b"])
    GatherTrainingFeatures().on_train_end(SimpleNamespace(world_size=2), pl_module)
    items = pl_module.feature_cache.training_items()
    assert [p for p, _ in items] == ["a", "b", "c"]
    assert torch.equal(items[2][1], torch.ones(2)) and pl_module.feature_cache.holds_all_training
    with pytest.raises(ValueError, match="cache_features true"):
        GatherTrainingFeatures().on_train_end(SimpleNamespace(world_size=2), _module(["a"], cache_features=False))
