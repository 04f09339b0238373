"""Task routing: which expert scores a test image when the task id is hidden.

:class:`TaskRouter` keeps per task the mean and precision of globally pooled backbone features
(a :class:`~.task_statistics.TaskStatistics`, fitted with the expert's other statistics) and
routes in one of two modes:

* ``prototype``: to the Mahalanobis-nearest task (as the public MoLE-Flow code);
* ``hybrid`` (notes V3-5, two stages) and ``memory``: shortlist the ``top_k`` nearest prototypes
  (the model uses Euclidean distance here: see ``RoutingConfig.prototype_metric``), then the candidate with the lowest *candidate score* wins. The model gives the score: for
  ``hybrid`` the candidate expert's mean per-patch NLL (minus the image log-likelihood; every
  candidate scores the same patches, so mean and sum decide alike), for ``memory`` the median
  over the image's patches of their distance to the candidate's patch memory, which a defect,
  a minority of the patches, does not move.

The prototype distances to all tasks come from one batched product over stacked statistics, and
stage 2 runs ``top_k`` candidates whatever the number of tasks, so routing costs about the same
at 2 and at 15 tasks.

Unknown products (off by default): at fit time each task gets a calibration distance, the
``calibration_quantile`` (0.99) of *cross-fitted* distances of its training images (each fold
scored against a prototype fitted on the other folds, so it is not biased low by in-sample
fitting). With ``unknown_threshold = t`` an image is :data:`UNKNOWN` when its distance to the
routed task exceeds ``t`` times that task's calibration distance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .gaussian import fit_gaussian, mahalanobis
from .task_statistics import TaskStatistics

UNKNOWN = -1
"""Task index of an image that no known task accepts."""

CandidateScore = Callable[[torch.Tensor, str], torch.Tensor]
"""``(features (b, H, W, C), task key) -> score (b,)`` of the images under that task; lower wins."""
MODES = ("prototype", "hybrid", "memory")
METRICS = ("mahalanobis", "euclidean")


class _TaskPrototype(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("precision", torch.zeros(channels, channels))
        self.register_buffer("calibration", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


class TaskRouter(TaskStatistics):
    """Prototype (or two-stage hybrid) router over pooled backbone features.

    Args:
        channels: Width of the pooled features.
        mode: ``"prototype"``, ``"hybrid"`` or ``"memory"``.
        top_k: Shortlist length of the two-stage modes.
        metric: ``"mahalanobis"`` (per-task precision) or ``"euclidean"`` (identity precision) distance
            to the prototypes; the calibration distances use the same metric.
        unknown_threshold: Multiple of a task's calibration distance beyond which an image is
            "unknown product"; ``None`` disables the flag.
        calibration_quantile: Quantile of cross-fitted training distances used as a task's
            calibration distance.
        calibration_folds: Folds for cross-fitting (in-sample when there are fewer than
            ``2 * folds`` images).
        ridge: Ridge added to the shrunk covariance, relative to its mean variance.
    """

    def __init__(
        self,
        channels: int,
        mode: str = "prototype",
        top_k: int = 2,
        metric: str = "mahalanobis",
        unknown_threshold: float | None = None,
        calibration_quantile: float = 0.99,
        calibration_folds: int = 5,
        ridge: float = 1e-5,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            msg = f"TaskRouter mode must be one of {', '.join(MODES)}, got {mode!r}"
            raise ValueError(msg)
        if metric not in METRICS:
            msg = f"TaskRouter metric must be one of {', '.join(METRICS)}, got {metric!r}"
            raise ValueError(msg)
        self.metric = metric
        self.channels = channels
        self.mode = mode
        self.top_k = top_k
        self.unknown_threshold = unknown_threshold
        self.calibration_quantile = calibration_quantile
        self.calibration_folds = calibration_folds
        self.ridge = ridge
        self._stacked: tuple[tuple, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
        self._revision = 0  # bumped whenever a task's statistics are stored or loaded

    def _new_task(self) -> nn.Module:
        return _TaskPrototype(self.channels)

    # ----------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, key: str, pooled: torch.Tensor) -> None:
        """Fit (or refit) task ``key`` on its training images' pooled features ``(N, C)``."""
        if pooled.dim() != 2 or pooled.shape[0] < 1:
            msg = f"TaskRouter.fit expects pooled features (N, C) with N >= 1, got shape {tuple(pooled.shape)}"
            raise ValueError(msg)
        if pooled.shape[1] != self.channels:
            msg = f"TaskRouter.fit got {pooled.shape[1]} channels, the router has {self.channels}"
            raise ValueError(msg)
        x = pooled.detach().double()
        mean, precision = self._fit_gaussian(x)
        self._store(key, mean=mean, precision=precision, calibration=self._calibrate(x, mean, precision))

    def _fit_gaussian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.metric == "euclidean":
            return x.mean(dim=0), torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        return fit_gaussian(x, self.ridge)

    def _calibrate(self, x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> float:
        """Quantile of cross-fitted (or, for tiny sets, in-sample) training distances."""
        n, folds = x.shape[0], self.calibration_folds
        if folds >= 2 and n >= 2 * folds:
            fold = torch.arange(n, device=x.device) % folds
            dist = torch.empty(n, dtype=x.dtype, device=x.device)
            for f in range(folds):
                held = fold == f
                fold_mean, fold_precision = self._fit_gaussian(x[~held])
                dist[held] = mahalanobis(x[held], fold_mean, fold_precision)
        else:
            dist = mahalanobis(x, mean, precision)
        value = torch.quantile(dist, self.calibration_quantile).item()
        return max(value, 1e-12)

    # ----------------------------------------------------------------- routing
    def _statistics(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Whitening of every task side by side ``(C, T * C)`` (``None`` for the Euclidean metric), the
        whitened means ``(T, C)`` (float32) and the fitted mask ``(T,)``, built once and kept until a
        task's statistics change.

        With ``precision = L L^T`` (Cholesky, in float64) the squared Mahalanobis distance is
        ``||x L - mean L||^2``: one matrix product of the pooled features with all tasks' ``L`` at
        once, no ``(T, B, C)`` difference tensor; it equals the float64 quadratic form to ~1e-7
        relative. The Euclidean metric needs no whitening: one ``cdist`` to the stacked means."""
        tasks = self.tasks
        stamp = (tuple(tasks.keys()), frozenset(self._fitted_keys), self._revision,
                 next(iter(tasks.values())).mean.data_ptr())  # fmt: skip
        if self._stacked is None or self._stacked[0] != stamp:
            states = list(tasks.values())
            fitted = torch.tensor([self.fitted(k) for k in tasks], device=states[0].mean.device)
            means = torch.stack([t.mean.double() for t in states])
            whitening = None
            if self.metric == "mahalanobis":
                factors = []
                for state, ok in zip(states, fitted.tolist(), strict=True):
                    precision = state.precision.double()
                    factors.append(torch.linalg.cholesky(precision) if ok else torch.zeros_like(precision))
                chol = torch.stack(factors)  # (T, C, C)
                means = torch.einsum("tc,tcd->td", means, chol)
                whitening = chol.permute(1, 0, 2).reshape(self.channels, -1).float().contiguous()  # (C, T * C)
            self._stacked = (stamp, whitening, means.float().contiguous(), fitted)
        return self._stacked[1], self._stacked[2], self._stacked[3]

    def _store(self, key: str, **values: torch.Tensor | float) -> None:
        super()._store(key, **values)
        self._revision += 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._revision += 1

    def distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """Distance (``metric``) ``(B, T)`` to every task in ``task_keys`` order (``inf`` while unfitted)."""
        if len(self.tasks) == 0:
            msg = "TaskRouter has no task yet: fit one first"
            raise RuntimeError(msg)
        whitening, means, fitted = self._statistics()
        x = pooled.to(means.device).float()
        if whitening is None:
            dist = torch.cdist(x, means)
        else:
            projected = (x @ whitening).view(x.shape[0], len(fitted), self.channels) - means  # (B, T, C)
            dist = projected.square().sum(dim=-1).sqrt()
        return torch.where(fitted[None], dist, torch.full_like(dist, float("inf")))

    def calibrations(self) -> torch.Tensor:
        """Calibration distance ``(T,)`` of each task."""
        return torch.stack([state.calibration for state in self.tasks.values()])

    def flag_unknown(self, distances: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Replace ``choice`` by :data:`UNKNOWN` where the chosen task's distance exceeds
        ``unknown_threshold`` times its calibration distance (no-op when disabled)."""
        if self.unknown_threshold is None:
            return choice
        chosen = distances.gather(1, choice[:, None]).squeeze(1)
        limit = self.unknown_threshold * self.calibrations().to(distances)[choice]
        return torch.where(chosen > limit, torch.full_like(choice, UNKNOWN), choice)

    @torch.no_grad()
    def forward(
        self,
        pooled: torch.Tensor,
        features: torch.Tensor,
        candidate_score: CandidateScore | None = None,
        candidate_calibration: Callable[[str], float] | None = None,
    ) -> torch.Tensor:
        """Task index ``(B,)`` in ``task_keys`` order, :data:`UNKNOWN` for unknown products.

        Args:
            pooled: Pooled features ``(B, C)`` (prototype distances).
            features: Patch features ``(B, H, W, C)`` for the two-stage modes.
            candidate_score: Score of images under a candidate task, lower wins (two-stage modes).
            candidate_calibration: A task's typical (99th-percentile) candidate score on its training
                images; with it, "unknown product" compares the winner's candidate score, not its
                prototype distance, with ``unknown_threshold`` times that scale.
        """
        if self.n_fitted == 0:
            msg = "TaskRouter has no fitted task"
            raise RuntimeError(msg)
        distances = self.distances(pooled)
        k = max(1, min(self.top_k, self.n_fitted)) if self.mode != "prototype" else 1
        if k == 1:
            return self.flag_unknown(distances, distances.argmin(dim=1))
        if candidate_score is None:
            msg = f"TaskRouter mode {self.mode!r} needs a candidate score"
            raise ValueError(msg)
        choice, best = self._by_candidate_score(distances, features, candidate_score, k)
        if candidate_calibration is None:
            return self.flag_unknown(distances, choice)
        if self.unknown_threshold is None:
            return choice
        keys = self.task_keys
        scale = torch.tensor([candidate_calibration(keys[i]) for i in choice.tolist()], dtype=best.dtype, device=best.device)
        return torch.where(best > self.unknown_threshold * scale, torch.full_like(choice, UNKNOWN), choice)

    def _by_candidate_score(
        self, distances: torch.Tensor, features: torch.Tensor, candidate_score: CandidateScore, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: among the ``k`` nearest prototypes, the candidate with the lowest score, and that
        score. Each candidate task scores once per batch, the images that shortlisted it."""
        candidates = distances.topk(k, dim=1, largest=False).indices  # (B, k)
        keys = self.task_keys
        scores = torch.full(candidates.shape, float("inf"), dtype=torch.float64, device=candidates.device)
        for task in candidates.unique().tolist():
            hits = candidates == task  # (B, k), at most one hit per row
            rows = hits.any(dim=1).nonzero(as_tuple=True)[0]
            values = candidate_score(features[rows.to(features.device)], keys[task]).double().to(scores.device)
            cols = hits[rows].float().argmax(dim=1)
            scores[rows, cols] = torch.nan_to_num(values, nan=float("inf"))
        best = scores.argmin(dim=1, keepdim=True)
        return candidates.gather(1, best).squeeze(1), scores.gather(1, best).squeeze(1)
