"""Per-fit feature cache: each image through the backbone once, training images in first-seen order."""

from __future__ import annotations

import torch

from anomalib_moleflow.models.moleflow.feature_cache import FeatureCache


class _Extractor:
    """Fake backbone: features are the images times two; counts the images it sees."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return images * 2.0


def _images(*values: float) -> torch.Tensor:
    """One ``(1, 2, 2)`` image per value."""
    return torch.tensor(values)[:, None, None, None].expand(-1, 1, 2, 2).clone()


def test_features_are_extracted_once_and_stored_detached_on_the_cpu() -> None:
    cache, extract = FeatureCache(), _Extractor()
    images = _images(1.0, 2.0).requires_grad_(True)
    first = cache.get(["a.png", "b.png"], images, extract)
    assert first.requires_grad  # the caller gets the extractor's own output
    assert len(cache) == 2 and extract.calls == [2]
    again = cache.get(["a.png", "b.png"], images.detach() * 0, extract)  # the pixels are not read again
    assert extract.calls == [2]
    assert torch.equal(again, first.detach()) and not again.requires_grad
    assert torch.equal(cache.get(["b.png"], images[:1], extract), first[1:].detach())  # any subset, any order


def test_a_batch_with_one_new_image_is_extracted_whole() -> None:
    cache, extract = FeatureCache(), _Extractor()
    cache.get(["a"], _images(1.0), extract)
    out = cache.get(["a", "c"], _images(1.0, 3.0), extract)
    assert extract.calls == [1, 2]
    assert torch.equal(out, _images(2.0, 6.0)) and len(cache) == 2


def test_paths_are_compared_as_strings() -> None:
    from pathlib import Path

    cache, extract = FeatureCache(), _Extractor()
    cache.get([Path("x") / "a.png"], _images(1.0), extract)
    cache.get(["x/a.png"], _images(5.0), extract)
    assert extract.calls == [1]


def test_training_images_in_first_seen_order_and_chunks() -> None:
    cache, extract = FeatureCache(), _Extractor()
    assert not cache.has_training and not cache.holds_all_training
    cache.record_training(["c", "a"])
    cache.record_training(["a", "b"])  # "a" again: keeps its first position
    assert cache.has_training and not cache.holds_all_training  # recorded, not cached yet
    cache.get(["a", "b", "c"], _images(1.0, 2.0, 3.0), extract)
    cache.get(["z"], _images(9.0), extract)  # a validation image: cached, not a training image
    assert cache.holds_all_training
    chunks = list(cache.training_chunks(torch.device("cpu"), chunk=2))
    assert [len(c) for c in chunks] == [2, 1]
    assert torch.equal(torch.cat(chunks), _images(6.0, 2.0, 4.0))  # c, a, b
    limited = list(cache.training_chunks(torch.device("cpu"), chunk=2, max_images=2))
    assert torch.equal(torch.cat(limited), _images(6.0, 2.0))


def test_clear_forgets_everything() -> None:
    cache, extract = FeatureCache(), _Extractor()
    cache.record_training(["a"])
    cache.get(["a"], _images(1.0), extract)
    cache.clear()
    assert len(cache) == 0 and not cache.has_training and not cache.holds_all_training
    assert list(cache.training_chunks(torch.device("cpu"))) == []
    cache.get(["a"], _images(1.0), extract)
    assert extract.calls == [1, 1]


def test_training_items_and_their_replacement() -> None:
    cache, extract = FeatureCache(), _Extractor()
    cache.record_training(["b", "a"])
    cache.get(["a", "b"], _images(1.0, 2.0), extract)
    items = cache.training_items()
    assert [p for p, _ in items] == ["b", "a"] and torch.equal(items[0][1], _images(4.0)[0])
    cache.replace_training([("c", _images(3.0)[0]), ("a", items[1][1])])  # e.g. every process's share
    assert cache.holds_all_training and [p for p, _ in cache.training_items()] == ["c", "a"]
    assert torch.equal(torch.cat(list(cache.training_chunks(torch.device("cpu")))), torch.cat([_images(3.0), _images(2.0)]))
