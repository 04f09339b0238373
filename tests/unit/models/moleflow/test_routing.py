"""Task router on synthetic Gaussian tasks: accuracy, hybrid stage 2, unknown flag, calibration,
state dicts."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from anomalib_moleflow.models.moleflow.gaussian import fit_gaussian, mahalanobis
from anomalib_moleflow.models.moleflow.routing import UNKNOWN, TaskRouter
from anomalib_moleflow.models.moleflow.task_statistics import TaskStatistics

DIM = 32
Task = tuple[torch.Tensor, torch.Tensor]


def _task(seed: int, shift: float) -> Task:
    """Sampler parameters of one synthetic task: mean and a random mixing matrix."""
    g = torch.Generator().manual_seed(seed)
    mean = shift * torch.randn(DIM, generator=g) / DIM**0.5
    mix = torch.randn(DIM, DIM, generator=g) * (0.3 + torch.rand(DIM, generator=g))
    return mean, mix / DIM**0.5


def _sample(task: Task, n: int, seed: int) -> torch.Tensor:
    """``n`` pooled feature vectors ``(n, DIM)`` of ``task``."""
    mean, mix = task
    return mean + torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) @ mix.T


TASKS = [_task(seed, shift=4.0) for seed in range(3)]
FAR = (torch.full((DIM,), 6.0), torch.eye(DIM) * 0.5)
"""A product none of the tasks is."""


def _fitted(n_train: int = 200, **kwargs: object) -> TaskRouter:
    """A router fitted on the three tasks, ``n_train`` images each."""
    router = TaskRouter(DIM, **kwargs)  # type: ignore[arg-type]
    for t, task in enumerate(TASKS):
        router.fit(str(t), _sample(task, n_train, seed=100 + t))
    return router


def _held_out(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unseen images of each task and their task indices."""
    x = torch.cat([_sample(task, n, seed=1000 + t) for t, task in enumerate(TASKS)])
    return x, torch.arange(len(TASKS)).repeat_interleave(n)


def _no_expert(features: torch.Tensor, key: str) -> torch.Tensor:
    """Expert NLL that the prototype mode must never ask for."""
    msg = f"prototype routing asked expert {key!r} for a likelihood"
    raise AssertionError(msg)


def _route(router: TaskRouter, pooled: torch.Tensor) -> torch.Tensor:
    """Prototype-mode routing (no patch features, no experts)."""
    return router(pooled, torch.zeros(len(pooled), 1, 1, 1), _no_expert)


# ----------------------------------------------------------------------------- prototype mode
def test_router_is_task_statistics_with_a_prototype_per_task() -> None:
    router = _fitted()
    assert isinstance(router, TaskStatistics)
    assert router.task_keys == ["0", "1", "2"]
    assert router.n_fitted == 3 and all(router.fitted(k) for k in router.task_keys)
    mean, precision = fit_gaussian(_sample(TASKS[1], 200, seed=101).double(), ridge=1e-5)
    state = router.tasks["1"]
    assert state.mean.dtype == torch.float32  # stored in the buffers' dtype, fitted in float64
    torch.testing.assert_close(state.mean, mean.float())
    torch.testing.assert_close(state.precision, precision.float())


@pytest.mark.parametrize("n_train", [200, 20])
def test_prototype_router_is_perfect_on_separable_tasks(n_train: int) -> None:
    """Also with N < C (20 images, 32 channels), where the plain covariance is singular."""
    router = _fitted(n_train)
    x, labels = _held_out()
    distances = router.distances(x)
    assert distances.shape == (len(x), 3) and distances.dtype == torch.float32
    assert torch.equal(_route(router, x), labels)
    assert torch.equal(distances.argmin(dim=1), labels)


def test_distances_are_mahalanobis_to_each_prototype() -> None:
    router = _fitted()
    x, _ = _held_out(5)
    expected = torch.stack(
        [mahalanobis(x, router.tasks[k].mean, router.tasks[k].precision) for k in router.task_keys], dim=1
    ).float()
    # float32 whitened product vs float64 quadratic form
    torch.testing.assert_close(router.distances(x), expected, rtol=1e-5, atol=1e-5)


def test_mahalanobis_beats_euclidean_on_anisotropic_tasks() -> None:
    wide = torch.randn(500, DIM) * torch.tensor([10.0] + [0.5] * (DIM - 1))
    narrow = torch.randn(500, DIM) * 0.5 + torch.tensor([12.0] + [0.0] * (DIM - 1))
    router = TaskRouter(DIM)
    router.fit("0", wide)
    router.fit("1", narrow)
    probe = torch.zeros(1, DIM)
    probe[0, 0] = -9.0  # far out in the wide task's long axis
    probe2 = torch.zeros(1, DIM)
    probe2[0, 0] = 7.0  # euclidean-closer to the narrow task's mean (12) than to 0
    assert _route(router, torch.cat([probe, probe2])).tolist() == [0, 0]


def test_euclidean_metric_is_the_plain_distance_to_each_mean() -> None:
    router = _fitted(metric="euclidean")
    x, labels = _held_out(20)
    means = torch.stack([router.tasks[k].mean for k in router.task_keys])
    torch.testing.assert_close(router.distances(x), torch.cdist(x, means), rtol=1e-5, atol=1e-5)
    assert (_route(router, x) == labels).float().mean() > 0.9


def test_euclidean_shortlist_keeps_an_image_whose_defect_lies_where_its_task_never_varied() -> None:
    """Task A's images barely vary, task B's (mean 1 away) vary widely: a defect along a direction
    A never varied in makes the image Mahalanobis-far from A, though A's mean stays the nearest."""
    g = torch.Generator().manual_seed(0)
    tight = 0.1 * torch.randn(200, DIM, generator=g)
    wide = torch.randn(200, DIM, generator=g) + torch.eye(DIM)[1]
    defective = torch.zeros(1, DIM)
    defective[0, 0] = 2.0
    routed = {}
    for metric in ("mahalanobis", "euclidean"):
        router = TaskRouter(DIM, metric=metric)
        router.fit("a", tight)
        router.fit("b", wide)
        routed[metric] = _route(router, defective).item()
    assert routed == {"mahalanobis": 1, "euclidean": 0}


def test_refitting_a_task_replaces_its_prototype() -> None:
    router = _fitted()
    x, labels = _held_out(50)
    router.fit("0", _sample(TASKS[2], 200, seed=5))  # task 0 now looks like task 2
    assert router.n_fitted == 3 and router.task_keys == ["0", "1", "2"]
    routed = _route(router, x)
    assert torch.equal(routed[labels == 1], labels[labels == 1])
    assert set(routed[labels == 0].tolist()) != {0}


def test_unfitted_tasks_are_never_chosen() -> None:
    router = _fitted()
    router.add_task("3")
    x, labels = _held_out(50)
    assert router.task_keys == ["0", "1", "2", "3"] and router.n_fitted == 3
    assert torch.isinf(router.distances(x)[:, 3]).all()
    assert torch.equal(_route(router, x), labels)
    empty = TaskRouter(DIM)
    with pytest.raises(RuntimeError, match="no task yet"):
        empty.distances(x)
    empty.add_task("0")
    with pytest.raises(RuntimeError, match="no fitted task"):
        _route(empty, x)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="one of prototype, hybrid, memory, got 'none'"):
        TaskRouter(DIM, mode="none")
    with pytest.raises(ValueError, match="metric must be one of mahalanobis, euclidean, got 'cosine'"):
        TaskRouter(DIM, metric="cosine")
    router = TaskRouter(DIM)
    with pytest.raises(ValueError, match=r"pooled features \(N, C\) with N >= 1, got shape \(2, 3, 32\)"):
        router.fit("0", torch.zeros(2, 3, DIM))
    with pytest.raises(ValueError, match=r"got shape \(0, 32\)"):
        router.fit("0", torch.zeros(0, DIM))
    with pytest.raises(ValueError, match="got 31 channels, the router has 32"):
        router.fit("0", torch.zeros(4, DIM - 1))
    assert router.task_keys == []  # nothing was created by the failed fits


# ----------------------------------------------------------------------------- unknown products
def test_unknown_flag_is_off_by_default_and_flags_only_far_products() -> None:
    far = _sample(FAR, 200, seed=7)
    x, labels = _held_out(500)
    router = _fitted()
    assert router.unknown_threshold is None
    assert (_route(router, far) >= 0).all()
    router.unknown_threshold = 1.5  # switchable after fitting
    assert (_route(router, far) == UNKNOWN).all()
    assert torch.equal(_route(router, x), labels)  # no held-out in-distribution image is flagged
    calibrations = router.calibrations()
    assert calibrations.shape == (3,) and (calibrations > 0).all()


def test_flag_unknown_compares_with_the_chosen_tasks_calibration() -> None:
    router = TaskRouter(2, unknown_threshold=2.0)
    router._store("0", mean=torch.zeros(2), precision=torch.eye(2), calibration=1.0)
    router._store("1", mean=torch.ones(2), precision=torch.eye(2), calibration=10.0)
    distances = torch.tensor([[1.9, 50.0], [2.1, 50.0], [50.0, 19.0], [50.0, 21.0], [50.0, 20.0]])
    choice = distances.argmin(dim=1)
    assert router.flag_unknown(distances, choice).tolist() == [0, UNKNOWN, 1, UNKNOWN, 1]  # at the limit: known
    router.unknown_threshold = None
    assert torch.equal(router.flag_unknown(distances, choice), choice)


def test_calibration_is_a_cross_fitted_quantile() -> None:
    """Each fold's distances come from a prototype fitted without it, so the calibration distance
    is not biased low by in-sample fitting; tiny sets fall back to in-sample distances."""
    x = _sample(TASKS[0], 60, seed=3)
    router = TaskRouter(DIM, calibration_quantile=0.9, calibration_folds=5)
    router.fit("0", x)
    x64 = x.double()
    fold = torch.arange(60) % 5
    cross = torch.empty(60, dtype=torch.float64)
    for f in range(5):
        held = fold == f
        cross[held] = mahalanobis(x64[held], *fit_gaussian(x64[~held], 1e-5))
    expected = torch.quantile(cross, 0.9).item()
    assert router.calibrations()[0].item() == pytest.approx(expected, rel=1e-6)
    in_sample = torch.quantile(mahalanobis(x64, *fit_gaussian(x64, 1e-5)), 0.9).item()
    assert expected > in_sample  # what the cross-fitting is for

    tiny = TaskRouter(DIM, calibration_quantile=0.9, calibration_folds=5)
    tiny.fit("0", x[:9])  # fewer than 2 * folds images
    small = x64[:9]
    assert tiny.calibrations()[0].item() == pytest.approx(
        torch.quantile(mahalanobis(small, *fit_gaussian(small, 1e-5)), 0.9).item(), rel=1e-6
    )
    single = TaskRouter(DIM)
    single.fit("0", x[:1])
    assert single.calibrations()[0].item() == pytest.approx(1e-12)  # a zero distance is kept positive


# ----------------------------------------------------------------------------- hybrid mode
def _label_nll(calls: list[tuple[str, int]]):  # noqa: ANN202
    """Fake candidate score: the mean patch NLL of an expert whose NLL is small where feature
    channel 0 equals the task index (what the model gives the hybrid router)."""

    def expert_nll(features: torch.Tensor, key: str) -> torch.Tensor:
        calls.append((key, len(features)))
        return ((features[..., 0] - float(key)) ** 2).flatten(1).mean(dim=1)

    return expert_nll


def _ambiguous_hybrid(top_k: int = 2) -> tuple[TaskRouter, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tasks 0/1 share one prototype cluster, tasks 2/3 another; returns the router, pooled
    features, patch features (channel 0 = the true task) and the labels."""
    cluster_a, cluster_b = _sample(TASKS[0], 200, seed=1), _sample(TASKS[1], 200, seed=2)
    router = TaskRouter(DIM, mode="hybrid", top_k=top_k)
    for key, data in (("0", cluster_a), ("1", cluster_a), ("2", cluster_b), ("3", cluster_b)):
        router.fit(key, data)
    labels = torch.tensor([0, 1, 2, 3, 1, 3, 0, 2])
    pooled = torch.stack([_sample(TASKS[0] if t < 2 else TASKS[1], 1, seed=50 + i)[0] for i, t in enumerate(labels)])
    features = torch.zeros(len(labels), 2, 2, 3)
    features[..., 0] = labels.float()[:, None, None]
    return router, pooled, features, labels


def test_hybrid_router_resolves_ambiguous_prototypes_with_likelihood() -> None:
    """Stage 1 cannot tell the pairs apart, stage 2 (the experts' likelihood) must, with per-image
    candidates."""
    router, pooled, features, labels = _ambiguous_hybrid()
    calls: list[tuple[str, int]] = []
    assert torch.equal(router(pooled, features, _label_nll(calls)), labels)
    assert sorted(calls) == [("0", 4), ("1", 4), ("2", 4), ("3", 4)]  # one call per expert, own images only
    prototype_only = router.distances(pooled).argmin(dim=1)
    assert not torch.equal(prototype_only, labels)  # stage 1 alone is ambiguous
    calls.clear()
    router.top_k = 1  # a shortlist of one is the prototype router
    assert torch.equal(router(pooled, features, _label_nll(calls)), prototype_only)
    assert calls == []


def test_hybrid_shortlist_is_limited_to_fitted_tasks() -> None:
    router, pooled, features, labels = _ambiguous_hybrid(top_k=10)
    router.add_task("4")  # unfitted: never a candidate
    calls: list[tuple[str, int]] = []
    assert torch.equal(router(pooled, features, _label_nll(calls)), labels)
    assert sorted(key for key, _ in calls) == ["0", "1", "2", "3"]


def test_hybrid_router_ranks_nan_likelihoods_last() -> None:
    router, pooled, features, _ = _ambiguous_hybrid()

    def nan_for_even(features: torch.Tensor, key: str) -> torch.Tensor:
        score = torch.zeros(len(features))
        return score.fill_(float("nan")) if int(key) % 2 == 0 else score

    routed = router(pooled, features, nan_for_even)
    assert set(routed.tolist()) <= {1, 3}


def test_two_stage_modes_pick_the_lowest_candidate_score() -> None:
    """The model gives the candidate score (hybrid: mean patch NLL; memory: median memory
    distance); the router takes the lowest among the shortlist, per image."""
    for mode in ("hybrid", "memory"):
        router = TaskRouter(DIM, mode=mode, top_k=2)
        data = _sample(TASKS[0], 100, seed=0)
        router.fit("0", data)
        router.fit("1", data)

        def score(features: torch.Tensor, key: str) -> torch.Tensor:
            return torch.where(features[:, 0, 0, 0] > 0, 1.0 - float(key), float(key))

        features = torch.tensor([1.0, -1.0, 1.0])[:, None, None, None].expand(3, 2, 2, 1)
        assert router(data[:3], features, score).tolist() == [1, 0, 1], mode


def test_memory_mode_flags_unknown_by_the_candidate_score_over_its_calibration() -> None:
    router = TaskRouter(DIM, mode="memory", top_k=2, unknown_threshold=1.5)
    data = _sample(TASKS[0], 100, seed=0)
    router.fit("0", data)
    router.fit("1", _sample(TASKS[1], 100, seed=1))
    scores = {"0": torch.tensor([1.0, 1.0, 4.0]), "1": torch.tensor([9.0, 9.0, 9.0])}
    calibration = {"0": 2.0, "1": 2.0}.__getitem__
    features = torch.zeros(3, 2, 2, 1)
    routed = router(data[:3], features, lambda f, key: scores[key][: len(f)], calibration)
    assert routed.tolist() == [0, 0, UNKNOWN]  # 4.0 > 1.5 * 2.0
    router.unknown_threshold = None
    assert router(data[:3], features, lambda f, key: scores[key][: len(f)], calibration).tolist() == [0, 0, 0]


def test_batched_distances_equal_each_tasks_mahalanobis() -> None:
    router = _fitted()
    x, _ = _held_out(20)
    expected = torch.stack(
        [mahalanobis(x, router.tasks[k].mean, router.tasks[k].precision) for k in router.task_keys], dim=1
    ).float()
    torch.testing.assert_close(router.distances(x), expected, rtol=1e-6, atol=1e-5)
    router.fit("1", _sample(TASKS[2], 200, seed=9))  # refitting a task refreshes the stacked statistics
    torch.testing.assert_close(router.distances(x)[:, 1], mahalanobis(x, router.tasks["1"].mean, router.tasks["1"].precision).float())


def test_hybrid_router_keeps_the_unknown_flag() -> None:
    router = TaskRouter(DIM, mode="hybrid", unknown_threshold=1.5)
    for t, task in enumerate(TASKS):
        router.fit(str(t), _sample(task, 200, seed=t))
    far = _sample(FAR, 4, seed=7)
    features = torch.zeros(4, 2, 2, 3)
    assert (router(far, features, _label_nll([])) == UNKNOWN).all()


# ----------------------------------------------------------------------------- state dicts
def test_state_dict_round_trip_into_a_fresh_router() -> None:
    router = _fitted(unknown_threshold=2.0)
    router.add_task("3")  # created, never fitted
    x, _ = _held_out(20)
    buffer = io.BytesIO()
    torch.save(router.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = TaskRouter(DIM, unknown_threshold=2.0)  # tasks are created by load_state_dict itself
    fresh.load_state_dict(state)
    assert fresh.task_keys == router.task_keys
    assert fresh.n_fitted == 3 and not fresh.fitted("3")
    assert torch.equal(fresh.distances(x), router.distances(x))
    assert torch.equal(fresh.calibrations(), router.calibrations())
    assert torch.equal(_route(fresh, x), _route(router, x))
    explicit = TaskRouter(DIM)
    for key in router.task_keys:
        explicit.add_task(key)
    explicit.load_state_dict(state)
    assert torch.equal(explicit.distances(x), router.distances(x))


def test_router_inside_a_parent_module_survives_its_state_dict() -> None:
    parent = nn.Module()
    parent.router = TaskRouter(DIM, mode="hybrid")
    for t, task in enumerate(TASKS):
        parent.router.fit(str(t), _sample(task, 100, seed=t))
    fresh = nn.Module()
    fresh.router = TaskRouter(DIM, mode="hybrid")
    fresh.load_state_dict(parent.state_dict())
    x, _ = _held_out(10)
    assert torch.equal(fresh.router.distances(x), parent.router.distances(x))
    assert fresh.router.n_fitted == 3
