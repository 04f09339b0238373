"""Task routers: pick the expert for a test image when the task id is hidden.

``PrototypeRouter`` keeps per task the mean and precision of globally pooled backbone
features and routes to the Mahalanobis-nearest task (as the public MoLE-Flow code).
``TwoStageHybridRouter`` (notes V3-5) shortlists the ``top_k`` nearest prototypes and lets
the candidate experts' likelihoods decide.

Covariance: with ~200 images and hundreds of channels the sample covariance is (nearly)
singular and a fixed ``+1e-5 I`` leaves distances dominated by noise directions. We use
Ledoit-Wolf shrinkage toward ``mu * I`` (``mu`` = mean variance, optimal weight in closed
form) plus a scale-invariant ridge ``ridge * mu`` (1e-5, as public). Fits run in float64.

Unknown products (off by default): at fit time each task gets a calibration distance,
the ``calibration_quantile`` (0.99) of *cross-fitted* distances of its training images
(each fold scored against a prototype fitted on the other folds, so it is not biased low
by in-sample fitting). With ``unknown_threshold = t`` an image is ``-1`` when its
distance to the routed task exceeds ``t`` times that task's calibration distance. The
threshold is a plain attribute; it can be switched on after fitting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

UNKNOWN = -1  # task index of an image no known task accepts


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """Global average of patch features ``(B, H, W, C)`` -> ``(B, C)``."""
    if features.dim() != 4:
        msg = f"pool_features expects (B, H, W, C) features, got shape {tuple(features.shape)}"
        raise ValueError(msg)
    return features.mean(dim=(1, 2))


def ledoit_wolf_covariance(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred samples ``x`` ``(N, C)`` (same dtype)."""
    n, c = x.shape
    emp = x.T @ x / n
    mu = torch.diagonal(emp).sum() / c
    x2 = x**2
    delta_ = (emp**2).sum()
    beta_ = ((x2.T @ x2).sum() / n - delta_) / (c * n)
    delta = (delta_ - 2 * mu * torch.diagonal(emp).sum() + c * mu**2) / c
    beta = torch.minimum(beta_, delta).clamp_min(0)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(delta))
    shrunk = (1 - shrinkage) * emp
    shrunk.diagonal().add_(shrinkage * mu)
    return shrunk


def _gaussian_stats(x: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision (inverse shrunk covariance) of ``x`` ``(N, C)`` in float64."""
    x = x.double()
    mean = x.mean(dim=0)
    cov = ledoit_wolf_covariance(x - mean) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1]).to(x)
    mu = torch.diagonal(cov).mean().item()
    if mu <= 0:  # one image, or all identical: fall back to Euclidean distance
        return mean, torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    cov.diagonal().add_(ridge * mu)
    return mean, torch.cholesky_inverse(torch.linalg.cholesky(cov))


def _mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances ``(N,)`` of ``x`` ``(N, C)`` (float64 arithmetic)."""
    diff = x.double() - mean.double()
    squared = ((diff @ precision.double()) * diff).sum(dim=1)
    return squared.clamp_min(0).sqrt()


class _TaskPrototype(nn.Module):
    """State of one task: buffers so it lives in the state dict."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("precision", torch.zeros(channels, channels))
        self.register_buffer("calibration", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


class PrototypeRouter(nn.Module):
    """Mahalanobis-nearest-prototype router over pooled backbone features.

    Args:
        channels: Feature width; inferred at the first ``fit_task`` when ``None``.
        unknown_threshold: Multiple of a task's calibration distance beyond which an
            image is "unknown product" (index ``-1``); ``None`` disables the flag.
        calibration_quantile: Quantile of cross-fitted training distances used as a
            task's calibration distance.
        calibration_folds: Folds for cross-fitting (in-sample when there are fewer
            than ``2 * folds`` images).
        ridge: Ridge added to the shrunk covariance, relative to its mean variance.
    """

    def __init__(
        self,
        channels: int | None = None,
        unknown_threshold: float | None = None,
        calibration_quantile: float = 0.99,
        calibration_folds: int = 5,
        ridge: float = 1e-5,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.unknown_threshold = unknown_threshold
        self.calibration_quantile = calibration_quantile
        self.calibration_folds = calibration_folds
        self.ridge = ridge
        self.slots = nn.ModuleDict()
        # Python-side mirror of the slots' ``fitted`` flags, so that code paths that ask
        # "how many tasks can be routed?" stay traceable (torch.export / ONNX).
        self._fitted_keys: set[str] = set()

    @property
    def task_keys(self) -> list[str]:
        """Task keys in routing order (``forward`` returns positions in this list)."""
        return list(self.slots.keys())

    def ensure_tasks(
        self, keys: Iterable[str | int], channels: int | None = None, device: torch.device | None = None
    ) -> None:
        """Create empty slots for missing ``keys`` (``load_state_dict`` also does it itself),
        on the device of existing slots, else ``device`` (default CPU)."""
        channels = channels or self.channels
        if channels is None:
            msg = "PrototypeRouter.ensure_tasks needs `channels` before the first fit"
            raise ValueError(msg)
        self.channels = channels
        buffer = next(self.buffers(), None)
        device = buffer.device if buffer is not None else (device or torch.device("cpu"))
        for key in keys:
            if str(key) not in self.slots:
                self.slots[str(key)] = _TaskPrototype(channels).to(device)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """Create the slots named in ``state_dict`` before the children load their buffers."""
        head = prefix + "slots."
        for name, value in state_dict.items():
            key = name[len(head) : -len(".mean")]
            if name.startswith(head) and name.endswith(".mean") and "." not in key and key not in self.slots:
                self.ensure_tasks([key], channels=value.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args)
        for name, value in state_dict.items():
            key = name[len(head) : -len(".fitted")]
            if name.startswith(head) and name.endswith(".fitted") and "." not in key:
                if bool(value):
                    self._fitted_keys.add(key)
                else:
                    self._fitted_keys.discard(key)

    def fit_task(self, key: str | int, pooled: torch.Tensor) -> None:
        """Fit (or refit) task ``key`` on its training images' pooled features ``(N, C)``."""
        if pooled.dim() != 2 or pooled.shape[0] < 1:
            msg = f"fit_task expects pooled features (N, C) with N >= 1, got shape {tuple(pooled.shape)}"
            raise ValueError(msg)
        if self.channels is not None and pooled.shape[1] != self.channels:
            msg = f"fit_task got {pooled.shape[1]} channels, router has {self.channels}"
            raise ValueError(msg)
        key = str(key)
        x = pooled.detach().double()
        mean, precision = _gaussian_stats(x, self.ridge)
        calibration = self._calibrate(x, mean, precision)
        self.ensure_tasks([key], channels=pooled.shape[1], device=pooled.device)
        slot = self.slots[key]
        device = slot.mean.device
        slot.mean = mean.to(device=device, dtype=torch.float32)
        slot.precision = precision.to(device=device, dtype=torch.float32)
        slot.calibration = torch.as_tensor(calibration, dtype=torch.float32, device=device)
        slot.fitted = torch.ones((), dtype=torch.bool, device=device)
        self._fitted_keys.add(key)

    def _calibrate(self, x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> float:
        """Quantile of cross-fitted (or, for tiny sets, in-sample) training distances."""
        n, folds = x.shape[0], self.calibration_folds
        if folds >= 2 and n >= 2 * folds:
            fold = torch.arange(n, device=x.device) % folds
            dist = torch.empty(n, dtype=x.dtype, device=x.device)
            for f in range(folds):
                held = fold == f
                fold_mean, fold_precision = _gaussian_stats(x[~held], self.ridge)
                dist[held] = _mahalanobis(x[held], fold_mean, fold_precision)
        else:
            dist = _mahalanobis(x, mean, precision)
        value = torch.quantile(dist, self.calibration_quantile).item()
        return max(value, 1e-12)

    def distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance ``(B, T)`` to every task in ``task_keys`` order (``inf``
        for unfitted slots)."""
        if len(self.slots) == 0:
            msg = "PrototypeRouter has no task yet: call fit_task() first"
            raise RuntimeError(msg)
        columns = [
            _mahalanobis(pooled.to(slot.mean.device), slot.mean, slot.precision)
            if bool(slot.fitted)
            else torch.full((len(pooled),), float("inf"), dtype=torch.float64, device=slot.mean.device)
            for slot in self.slots.values()
        ]
        return torch.stack(columns, dim=1).float()

    @property
    def n_fitted(self) -> int:
        """Number of fitted tasks."""
        return len(self._fitted_keys & set(self.slots.keys()))

    def calibrations(self) -> torch.Tensor:
        """Calibration distance ``(T,)`` of each task."""
        return torch.stack([slot.calibration for slot in self.slots.values()])

    def flag_unknown(self, distances: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Replace ``choice`` by ``-1`` where the chosen task's distance exceeds
        ``unknown_threshold`` times its calibration distance (no-op when disabled)."""
        if self.unknown_threshold is None:
            return choice
        chosen = distances.gather(1, choice[:, None]).squeeze(1)
        limit = self.unknown_threshold * self.calibrations().to(distances)[choice]
        return torch.where(chosen > limit, torch.full_like(choice, UNKNOWN), choice)

    @torch.no_grad()
    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Task index ``(B,)`` (position in ``task_keys``), ``-1`` for unknown products."""
        if self.n_fitted == 0:
            msg = "PrototypeRouter has no fitted task: call fit_task() first"
            raise RuntimeError(msg)
        distances = self.distances(pooled)
        return self.flag_unknown(distances, distances.argmin(dim=1))

    def route_keys(self, pooled: torch.Tensor) -> list[str | None]:
        """Like ``forward`` but returns task keys (``None`` for unknown products)."""
        keys = self.task_keys
        return [keys[i] if i >= 0 else None for i in self(pooled).tolist()]


ScoreFn = Callable[[torch.Tensor, str], torch.Tensor]  # (features (b,H,W,C), key) -> patch NLL (b,H,W)


class TwoStageHybridRouter(nn.Module):
    """Prototype shortlist, then likelihood decision (notes V3-5).

    Stage 1 keeps the ``top_k`` Mahalanobis-nearest tasks per image. Stage 2 scores the
    image with each candidate expert and picks the highest image log-likelihood, taken
    as minus the *mean* per-patch NLL. (Every candidate scores the same patches, so mean
    and sum give the same decision; the mean keeps values on a per-patch scale.)
    Each expert runs once per batch, on just the images that shortlisted it.

    Args:
        prototype: The stage-1 router; a new ``PrototypeRouter(**prototype_kwargs)``
            when ``None``.
        top_k: Default shortlist length.
        **prototype_kwargs: Passed to ``PrototypeRouter`` when ``prototype`` is ``None``.
    """

    def __init__(self, prototype: PrototypeRouter | None = None, top_k: int = 2, **prototype_kwargs: Any) -> None:
        super().__init__()
        self.prototype = prototype if prototype is not None else PrototypeRouter(**prototype_kwargs)
        self.top_k = top_k

    @property
    def task_keys(self) -> list[str]:
        """Task keys of the stage-1 router."""
        return self.prototype.task_keys

    def fit_task(self, key: str | int, pooled: torch.Tensor) -> None:
        """Fit the stage-1 prototype of task ``key``."""
        self.prototype.fit_task(key, pooled)

    def ensure_tasks(self, keys: Iterable[str | int], channels: int | None = None, device: Any = None) -> None:
        """Create empty prototype slots (see ``PrototypeRouter.ensure_tasks``)."""
        self.prototype.ensure_tasks(keys, channels, device)

    def distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """Stage-1 Mahalanobis distances ``(B, T)``."""
        return self.prototype.distances(pooled)

    @torch.no_grad()
    def forward(
        self, pooled: torch.Tensor, features: torch.Tensor, score_fn: ScoreFn, top_k: int | None = None
    ) -> torch.Tensor:
        """Task index ``(B,)`` in ``task_keys`` order (``-1``: unknown product).

        Args:
            pooled: Pooled features ``(B, C)`` for stage 1.
            features: Patch features ``(B, H, W, C)`` handed to ``score_fn``.
            score_fn: Per-patch NLL of ``features`` under expert ``key``.
            top_k: Shortlist length; ``self.top_k`` when ``None``.
        """
        n_fitted = self.prototype.n_fitted
        if n_fitted == 0:
            msg = "TwoStageHybridRouter has no fitted task: call fit_task() first"
            raise RuntimeError(msg)
        distances = self.prototype.distances(pooled)
        k = max(1, min(top_k or self.top_k, n_fitted))
        if k == 1:  # argmin: the same tie-breaking as the prototype router
            return self.prototype.flag_unknown(distances, distances.argmin(dim=1))
        candidates = distances.topk(k, dim=1, largest=False).indices  # (B, k)
        keys = self.task_keys
        loglik = torch.full(candidates.shape, float("-inf"), device=candidates.device)
        for task in candidates.unique().tolist():
            hits = candidates == task  # (B, k), at most one hit per row
            rows = hits.any(dim=1).nonzero(as_tuple=True)[0]
            nll = score_fn(features[rows.to(features.device)], keys[task])
            values = -nll.flatten(1).double().mean(dim=1).to(loglik)
            cols = hits[rows].float().argmax(dim=1)
            loglik[rows, cols] = torch.nan_to_num(values, nan=float("-inf"))
        best = loglik.argmax(dim=1, keepdim=True)
        return self.prototype.flag_unknown(distances, candidates.gather(1, best).squeeze(1))
