"""Backbone features of one fit's images, kept so that each image goes through the frozen
backbone once per task instead of once per epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch


class FeatureCache:
    """Features by image path, plus the order in which this fit's training images first came.

    The backbone is frozen and pre-processing is deterministic, so during one fit an image's
    features never change.
    """

    def __init__(self) -> None:
        self._features: dict[str, torch.Tensor] = {}
        self._train_paths: dict[str, None] = {}  # ordered set

    def clear(self) -> None:
        """Forget everything (a new fit, or a new task)."""
        self._features.clear()
        self._train_paths.clear()

    def __len__(self) -> int:
        return len(self._features)

    def record_training(self, paths: Sequence[str]) -> None:
        """Note ``paths`` as training images of this fit (first-seen order is kept)."""
        for path in paths:
            self._train_paths[str(path)] = None

    @property
    def has_training(self) -> bool:
        """Whether any training image was recorded in this fit."""
        return bool(self._train_paths)

    @property
    def holds_all_training(self) -> bool:
        """Whether every recorded training image has cached features."""
        return bool(self._train_paths) and all(p in self._features for p in self._train_paths)

    def get(self, paths: Sequence[str], images: torch.Tensor, extract: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Features of a batch: from the cache when every image is in it, else ``extract(images)``
        (then stored, on the CPU)."""
        paths = [str(p) for p in paths]
        if all(p in self._features for p in paths):
            return torch.stack([self._features[p] for p in paths]).to(images.device)
        features = extract(images)
        for path, feat in zip(paths, features, strict=True):
            self._features[path] = feat.detach().cpu()
        return features

    def training_items(self) -> list[tuple[str, torch.Tensor]]:
        """``(path, features)`` of this fit's cached training images, in first-seen order."""
        return [(p, self._features[p]) for p in self._train_paths if p in self._features]

    def replace_training(self, items: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Make ``items`` (``(path, features)``, in order) this fit's training images, e.g. every
        process's share under DDP."""
        self._train_paths.clear()
        for path, features in items:
            self._features[str(path)] = features.detach().cpu()
            self._train_paths[str(path)] = None

    def training_chunks(self, device: torch.device, chunk: int = 32, max_images: int | None = None) -> Iterator[torch.Tensor]:
        """Cached training features in first-seen order, ``chunk`` images at a time."""
        paths = list(self._train_paths)[:max_images]
        for start in range(0, len(paths), chunk):
            yield torch.stack([self._features[p] for p in paths[start : start + chunk]]).to(device)
