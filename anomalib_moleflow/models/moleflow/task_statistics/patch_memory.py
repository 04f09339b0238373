"""A per-task memory of normal patches (beyond the notes): nearest-neighbour evidence beside the flow.

Per task a fixed number of the task's training patches (a random sample; the position embedding
is removed, so the memory matches patches wherever they sit) and three reference distributions
from its training images: their nearest-memory distances (each image's own patches left out of
the memory, so these are distances of patches the memory has not seen), their anomaly-map scores
without the memory, and the per-image mean of the ``top_k`` largest memory distances.

* **anomaly map**: ``surprisal(map score) + surprisal(memory distance)``, where
  ``surprisal(x) = -log P(training patch score >= x)`` (interpolated between training values, so
  continuous): both evidences on one scale, without a weight to tune;
* **image score**: ``weight * z(top-k memory distance)`` is added to the fused image score;
* **routing**: a low quantile (``router_quantile``; the median by default) over an image's patches
  of their distance to the first ``router_size`` memory patches of a candidate task (a defect is a
  minority of patches, so it does not move a low quantile); that score over its 99th percentile on
  the task's training images tells an unknown product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .base import TaskStatistics

REFERENCE_SIZE = 8192
"""Training patch scores kept (sorted) per reference distribution; surprisal resolution ``1 / 8192``."""


class _TaskMemory(nn.Module):
    def __init__(self, size: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, channels))
        self.register_buffer("distance_reference", torch.zeros(REFERENCE_SIZE))
        self.register_buffer("map_reference", torch.zeros(REFERENCE_SIZE))
        self.register_buffer("image_stats", torch.tensor([0.0, 1.0]))  # mean, sd of the top-k distance
        self.register_buffer("routing_calibration", torch.ones(()))  # 99th percentile of training routing scores
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


def nearest_distances(x: torch.Tensor, bank: torch.Tensor, exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
                      chunk: int = 4096) -> torch.Tensor:  # fmt: skip
    """Euclidean distance ``(N,)`` of each row of ``x`` ``(N, C)`` to its nearest row of ``bank``.

    ``exclude=(x_group, bank_group)`` leaves out bank rows of the same group (e.g. the same image).
    The nearest row is found with one matrix product; its distance is then taken from the
    difference itself (:func:`row_distance`), which stays exact to rounding for a patch at or
    near a memory patch, where the expanded ``|x|^2 - 2 x.b + |b|^2`` leaves only rounding noise.
    """
    bank_sq = (bank**2).sum(1)
    if exclude is None and (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()):
        # one product in an exported graph: a Python loop over rows would fix the batch size
        nearest = ((x**2).sum(1, keepdim=True) - 2 * x @ bank.T + bank_sq).argmin(dim=1)
        return row_distance(x, bank[nearest])
    out = x.new_empty(len(x))
    for start in range(0, len(x), chunk):
        rows = x[start : start + chunk]
        squared = (rows**2).sum(1, keepdim=True) - 2 * rows @ bank.T + bank_sq
        if exclude is not None:
            same = exclude[0][start : start + chunk, None] == exclude[1][None]
            squared = squared.masked_fill(same, float("inf"))
        out[start : start + len(rows)] = row_distance(rows, bank[squared.argmin(dim=1)])
    return out


def patch_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``ceil(q * n)``-th smallest of each row of ``values`` ``(B, n)``, shape ``(B,)``: for
    ``q = 0.5`` the lower median, as ``torch.median`` gives it. A sort and an index, so that an
    exported graph computes it exactly as eager PyTorch does (``median`` and ``quantile`` have no
    ONNX form)."""
    n = values.shape[1]
    index = min(n, max(1, math.ceil(q * n))) - 1
    return values.sort(dim=1).values[:, index]


def row_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between matching rows of ``x`` and ``y`` ``(..., C)``, shape ``(...)``."""
    return (x - y).square().sum(dim=-1).sqrt()


def _sorted_sample(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:data:`REFERENCE_SIZE` values of ``values`` (with repeats when there are fewer), sorted."""
    flat = values.flatten()
    index = torch.randint(len(flat), (REFERENCE_SIZE,), generator=generator) if len(flat) < REFERENCE_SIZE else (
        torch.randperm(len(flat), generator=generator)[:REFERENCE_SIZE]
    )  # fmt: skip
    return flat[index.to(flat.device)].sort().values


BEYOND_SLOPE = 0.01
"""Beyond the largest training value the surprisal keeps rising, slowly: ``0.01`` per spread of the
reference's upper half. The cap alone ties every value beyond training (a tiny training set then
loses the ranking among them); a steep rise lets one evidence outweigh the other."""


def surprisal(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``-log P(X >= value)`` under the training distribution ``reference`` (sorted, ``n`` values,
    ``+1`` so it stays finite), the count of training values below ``value`` interpolated linearly
    between consecutive distinct training values (:func:`interpolated_count`), so that the
    surprisal is continuous; beyond the largest value it grows by :data:`BEYOND_SLOPE` per
    ``max - median`` of the reference."""
    count = interpolated_count(values.reshape(1, -1), reference[None]).view(values.shape)
    return surprisal_of_count(values, count, reference[-1], reference[len(reference) // 2], len(reference))


def _count_below(reference: torch.Tensor, values: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
    """Count ``(B, N)`` of the values of each sorted row of ``reference (B, R)`` that are ``<`` (or
    ``<=``) ``values (B, N)``: ``searchsorted``, or in an exported graph the same count as a sum of
    comparisons (operators every runtime has)."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        compared = reference[:, None, :] <= values[..., None] if inclusive else reference[:, None, :] < values[..., None]
        return compared.sum(dim=-1)
    return torch.searchsorted(reference.contiguous(), values.contiguous(), right=inclusive)


def interpolated_count(values: torch.Tensor, reference: torch.Tensor, upper: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous count ``(B, N)`` of the training values below ``values (B, N)`` under each row's
    sorted ``reference (B, R)``; ``upper (B, R)``, if given, is :func:`upper_counts` of ``reference``
    (it spares a second search).

    Between two consecutive distinct reference values ``a < b`` (``b`` repeated up to index
    ``upper - 1``) it rises linearly from ``below`` to ``upper``, the count of values ``<= b``; at
    or under the smallest reference value it is that value's count; beyond the largest, ``R``.
    A plain count jumps by the number of repeats of a value (the reference repeats values when
    training had fewer patches than it keeps), so float rounding alone (another runtime, another
    batch size) could move a surprisal by up to ``log(repeats + 1)`` where a patch scores within
    rounding of a training value, as on the training images themselves; this count moves only
    as much as the value does.
    """
    n = reference.shape[-1]
    below = _count_below(reference, values)  # reference values < value
    index = below.clamp(max=n - 1)
    high = reference.gather(1, index)  # the smallest reference value >= value
    low = reference.gather(1, (below - 1).clamp(min=0))  # the largest one < value (where below > 0)
    upper = _count_below(reference, high, inclusive=True) if upper is None else upper.gather(1, index)
    fraction = ((values - low) / (high - low).clamp_min(torch.finfo(values.dtype).tiny)).clamp(0, 1)
    count = below + fraction * (upper - below)
    count = torch.where(below == 0, upper.to(count.dtype), count)
    return torch.where(below >= n, torch.full_like(count, n), count)


def upper_counts(reference: torch.Tensor) -> torch.Tensor:
    """Count ``(B, R)`` of the values of each sorted row of ``reference (B, R)`` that are ``<=`` each of its values."""
    return torch.searchsorted(reference.contiguous(), reference.contiguous(), right=True)


def surprisal_of_count(values: torch.Tensor, count: torch.Tensor, top: torch.Tensor, median: torch.Tensor, n: int) -> torch.Tensor:
    """``-log((n - count + 1) / (n + 1))``, plus :data:`BEYOND_SLOPE` per ``top - median`` beyond ``top``."""
    empirical = -torch.log((n - count + 1).to(values.dtype) / (n + 1))
    spread = (top - median).clamp_min(1e-12)
    return torch.where(values > top, empirical + BEYOND_SLOPE * (values - top) / spread, empirical)


class PatchMemory(TaskStatistics):
    """Per-task memories of normal patches over ``(B, H, W, C)`` features.

    Args:
        channels: ``C``, the patch feature width.
        size: Patches kept per task.
        top_k: Largest memory distances averaged into the image-level memory score.
        router_size: Memory patches the routing score compares against (the first of the memory).
        router_quantile: Quantile of an image's patch distances that is its routing score.
        position_embedding: ``(H, W, C)`` embedding that the features carry, removed before matching.
        seed: Seed of the patch sampling (each task draws from its own generator).
    """

    def __init__(
        self,
        channels: int,
        size: int,
        top_k: int = 3,
        router_size: int | None = None,
        position_embedding: torch.Tensor | None = None,
        seed: int = 0,
        router_quantile: float = 0.5,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.size = size
        self.top_k = top_k
        self.router_size = min(router_size or size, size)
        self.router_quantile = router_quantile
        self.seed = seed
        self.register_buffer("position_embedding", position_embedding, persistent=False)

    def _new_task(self) -> nn.Module:
        return _TaskMemory(self.size, self.channels)

    def _patches(self, features: torch.Tensor) -> torch.Tensor:
        x = features[..., : self.channels]
        if self.position_embedding is not None:
            x = x - self.position_embedding.to(x.dtype)
        return x

    def _image_score(self, distances: torch.Tensor) -> torch.Tensor:
        flat = distances.flatten(1)
        return flat.topk(max(1, min(self.top_k, flat.shape[1])), dim=1).values.mean(dim=1)

    @torch.no_grad()
    def fit(self, key: str, features: Sequence[torch.Tensor], map_scores: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Fit task ``key`` from its training features (chunks of ``(b, H, W, C)``) and the anomaly-map
        scores ``(b, H, W)`` that ``map_scores`` gives them (without the memory)."""
        chunks = list(features)
        patches = torch.cat([self._patches(f) for f in chunks])  # (N, H, W, C)
        n_images = len(patches)
        if n_images < 2:
            msg = f"PatchMemory.fit needs at least 2 training images for task {key!r}, got {n_images}"
            raise ValueError(msg)
        per_image = patches.shape[1] * patches.shape[2]
        flat = patches.reshape(-1, self.channels)
        image = torch.arange(n_images, device=flat.device).repeat_interleave(per_image)
        generator = torch.Generator().manual_seed(self.seed + int(key) if key.isdigit() else self.seed)
        order = torch.randperm(len(flat), generator=generator).to(flat.device)
        take = order[torch.arange(self.size, device=flat.device) % len(order)]
        bank, bank_image = flat[take], image[take]
        distances = nearest_distances(flat, bank, exclude=(image, bank_image)).view(patches.shape[:3])
        routing = nearest_distances(flat, bank[: self.router_size], exclude=(image, bank_image[: self.router_size]))
        routing_scores = patch_quantile(routing.view(n_images, -1), self.router_quantile).double()
        map_values = torch.cat([map_scores(f) for f in chunks])
        image_scores = self._image_score(distances).double()
        self._store(
            key,
            bank=bank,
            routing_calibration=torch.quantile(routing_scores, 0.99).clamp_min(1e-12),
            distance_reference=_sorted_sample(distances, generator),
            map_reference=_sorted_sample(map_values, generator),
            image_stats=torch.stack([image_scores.mean(), image_scores.std().clamp_min(1e-6)]),
        )

    def distances(self, key: str, features: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Nearest-memory distance ``(B, H, W)`` of each patch under task ``key`` (its first ``size``
        memory patches when given)."""
        x = self._patches(features)
        bank = self.tasks[key].bank[:size]
        return nearest_distances(x.reshape(-1, self.channels), bank.to(x.dtype)).view(x.shape[:3])

    def routing_score(self, key: str, features: torch.Tensor) -> torch.Tensor:
        """The ``router_quantile`` (median by default) over each image's patches of their distance to
        task ``key``'s first ``router_size`` memory patches ``(B,)``: lower means more like that task."""
        return patch_quantile(self.distances(key, features, self.router_size).flatten(1), self.router_quantile)

    def routing_calibration(self, key: str) -> float:
        """The 99th percentile of task ``key``'s training images' routing scores (each image's own
        patches left out of the memory): the scale of "unknown product" for that task."""
        return float(self.tasks[key].routing_calibration)

    def fuse_map(self, key: str, map_scores: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """``surprisal(map score) + surprisal(memory distance)`` per patch ``(B, H, W)``."""
        state = self.tasks[key]
        return surprisal(map_scores, state.map_reference.to(map_scores.dtype)) + surprisal(
            distances, state.distance_reference.to(distances.dtype)
        )

    def image_z(self, key: str, distances: torch.Tensor) -> torch.Tensor:
        """z-score ``(B,)`` of the image-level memory score against task ``key``'s training images."""
        stats = self.tasks[key].image_stats.to(distances.dtype)
        return (self._image_score(distances) - stats[0]) / stats[1]
