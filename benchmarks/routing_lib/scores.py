"""Routing and unknown-product scores compared side by side by ``benchmarks/routing_study.py``.

Every score here reads backbone features only (no flow): the router's prototypes, the patch
memory and a position-conditional Gaussian are fitted from a task's training features, so a study
needs no training. Each router variant maps test features ``(B, H, W, C)`` to a task index per
image; each unknown score maps them to ``(B, T)`` ratios (one per task, 1.0 = the 99th percentile
of that task's held-out training images), the image's unknown score being the smallest ratio over
the tasks it may belong to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from anomalib_moleflow.models.moleflow import MoLEFlowModel
from anomalib_moleflow.models.moleflow.gaussian import fit_gaussian, mahalanobis, pool_features
from anomalib_moleflow.models.moleflow.task_statistics.position_gaussian import PositionGaussian

#: Held-out folds of a task's training images that calibrate its Gaussian scores.
FOLDS = 5
#: Quantile of the held-out training scores that a ratio of 1.0 stands for.
CALIBRATION_QUANTILE = 0.99
#: Lower quantile of the position-Gaussian patch distances: a defect is a minority of patches.
POSITION_QUANTILE = 0.25


def folds(n: int, k: int = FOLDS, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` (train, held-out) index splits of ``n`` images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for fold in range(k):
        held = order[fold::k]
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        yield keep.nonzero(as_tuple=True)[0], held


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    return torch.quantile(values.flatten(1).double(), q, dim=1)


@dataclass
class TaskGaussians:
    """One task's position Gaussian and global Gaussian with their held-out calibrations."""

    position: PositionGaussian
    global_mean: torch.Tensor
    global_precision: torch.Tensor
    position_scale: torch.Tensor
    global_scale: torch.Tensor
    prototypes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """``{pooling: (mean, precision)}`` of the pooled training features (``mean`` or ``median`` pooling)."""


@dataclass
class StudyModel:
    """A MoLE-Flow model holding only per-task statistics, plus the study's own Gaussians."""

    model: MoLEFlowModel
    names: list[str]
    gaussians: list[TaskGaussians] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.model.channels

    def position_score(self, index: int, features: torch.Tensor) -> torch.Tensor:
        g = self.gaussians[index]
        return _quantile(g.position("0", features[..., : self.channels]), POSITION_QUANTILE)

    def global_score(self, index: int, features: torch.Tensor) -> torch.Tensor:
        g = self.gaussians[index]
        return mahalanobis(self.model.global_input(features).double(), g.global_mean, g.global_precision)

    def memory_distances(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, H*W, T)`` distance of every patch to each task's router memory."""
        memory = self.model.patch_memory
        return torch.stack([memory.distances(key, features, memory.router_size).flatten(1) for key in self.model.task_keys], -1)


def pooled(features: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, C)`` patch features pooled by their ``mean`` or ``median`` over the grid."""
    if pooling == "mean":
        return pool_features(features)
    return features.flatten(1, 2).median(dim=1).values


def _fit_gaussians(study: StudyModel, train: torch.Tensor) -> TaskGaussians:
    c = study.channels
    grid = tuple(train.shape[1:3])
    held_position, held_global = [], []
    for keep, held in folds(len(train)):
        pg = PositionGaussian(grid, c)
        pg.fit("0", [train[keep][..., :c]])
        held_position.append(_quantile(pg("0", train[held][..., :c]), POSITION_QUANTILE))
        mean, precision = fit_gaussian(study.model.global_input(train[keep]).double(), ridge=1e-5)
        held_global.append(mahalanobis(study.model.global_input(train[held]).double(), mean, precision))
    position = PositionGaussian(grid, c)
    position.fit("0", [train[..., :c]])
    mean, precision = fit_gaussian(study.model.global_input(train).double(), ridge=1e-5)
    ridge = study.model.router.ridge
    return TaskGaussians(
        position=position,
        global_mean=mean,
        global_precision=precision,
        prototypes={pooling: fit_gaussian(pooled(train, pooling), ridge) for pooling in ("mean", "median")},
        position_scale=torch.quantile(torch.cat(held_position), CALIBRATION_QUANTILE).clamp_min(1e-12),
        global_scale=torch.quantile(torch.cat(held_global), CALIBRATION_QUANTILE).clamp_min(1e-12),
    )


@torch.no_grad()
def fit_study(model: MoLEFlowModel, names: Sequence[str], train: Sequence[torch.Tensor], chunk: int = 32) -> StudyModel:
    """Add one task per product to ``model`` and fit its statistics (router prototype, patch memory)
    and the study's Gaussians from its training features."""
    study = StudyModel(model=model, names=list(names))
    for name, features in zip(names, train, strict=True):
        key = model.add_task(name)
        model.fit_task_statistics(key, list(features.split(chunk)))
        study.gaussians.append(_fit_gaussians(study, features))
    return study


# ----------------------------------------------------------------------------- routers
Router = Callable[[StudyModel, torch.Tensor], torch.Tensor]


def route_default(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
    """The model's own router (its configured default)."""
    return study.model.route(x)


def route_default_quantile(q: float) -> Router:
    """The model's own router with the memory stage's patch quantile set to ``q``."""

    def route(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
        memory = study.model.patch_memory
        previous = memory.router_quantile
        memory.router_quantile = q
        try:
            return study.model.route(x)
        finally:
            memory.router_quantile = previous

    return route


def route_prototype(metric: str, pooling: str = "mean") -> Router:
    """Nearest task prototype; ``pooling`` ``median`` pools the patches by their median (a trimmed
    prototype, against defects that move the mean)."""

    def route(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
        p = pooled(x, pooling).double()
        columns = []
        for g in study.gaussians:
            mean, precision = g.prototypes[pooling]
            columns.append((p - mean).norm(dim=1) if metric == "euclidean" else mahalanobis(p, mean, precision))
        return torch.stack(columns, 1).argmin(dim=1)

    return route


def route_memory_statistic(statistic: str) -> Router:
    """Among all tasks, the one whose memory is nearest by a per-image statistic of the patch
    distances: ``median``, ``q25`` (lower quartile) or ``vote`` (each patch votes for its nearest task)."""

    def route(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
        d = study.memory_distances(x)
        if statistic == "vote":
            return torch.nn.functional.one_hot(d.argmin(-1), d.shape[-1]).sum(1).argmax(-1)
        q = {"median": 0.5, "q25": 0.25}[statistic]
        return torch.quantile(d.double(), q, dim=1).argmin(-1)

    return route


def route_position(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
    """The task whose position Gaussian explains the lower quartile of patches best (calibrated)."""
    ratios = torch.stack([study.position_score(i, x) / g.position_scale for i, g in enumerate(study.gaussians)], 1)
    return ratios.argmin(1)


ROUTERS: dict[str, Router] = {
    "model default (memory router, Euclidean top-2 shortlist)": route_default,
    "memory router with the median, top-2 shortlist": route_default_quantile(0.5),
    "memory router with the lower quartile, top-2 shortlist": route_default_quantile(0.25),
    "prototype, Mahalanobis, mean-pooled": route_prototype("mahalanobis"),
    "prototype, Euclidean, mean-pooled": route_prototype("euclidean"),
    "prototype, Euclidean, median-pooled": route_prototype("euclidean", "median"),
    "memory median, all tasks": route_memory_statistic("median"),
    "memory lower quartile, all tasks": route_memory_statistic("q25"),
    "memory patch vote, all tasks": route_memory_statistic("vote"),
    "position Gaussian lower quartile": route_position,
}


# ----------------------------------------------------------------------------- unknown scores
UnknownScore = Callable[[StudyModel, torch.Tensor], torch.Tensor]


def unknown_memory(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: median memory distance over the task's routing calibration (the model's own test)."""
    memory = study.model.patch_memory
    scale = torch.tensor([memory.routing_calibration(k) for k in study.model.task_keys], dtype=torch.float64)
    return study.memory_distances(x).median(dim=1).values.double() / scale


def unknown_position(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: position-Gaussian lower quartile over its held-out calibration."""
    return torch.stack([study.position_score(i, x) / g.position_scale for i, g in enumerate(study.gaussians)], 1)


def unknown_global(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: global Mahalanobis distance over its held-out calibration."""
    return torch.stack([study.global_score(i, x) / g.global_scale for i, g in enumerate(study.gaussians)], 1)


def unknown_position_global(study: StudyModel, x: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: geometric mean of the position and global ratios."""
    return (unknown_position(study, x).log() + unknown_global(study, x).log()).div(2).exp()


UNKNOWN_SCORES: dict[str, UnknownScore] = {
    "memory median (model default)": unknown_memory,
    "position Gaussian lower quartile": unknown_position,
    "global Mahalanobis": unknown_global,
    "position x global (geometric mean)": unknown_position_global,
}
