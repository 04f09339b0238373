"""The per-task patch memory: nearest distances, surprisal fusion, image z-score, routing score,
fitting and state dicts, on synthetic patch features."""

from __future__ import annotations

import io
import math

import pytest
import torch

from anomalib_moleflow.models.moleflow.task_statistics.patch_memory import (
    BEYOND_SLOPE,
    REFERENCE_SIZE,
    PatchMemory,
    nearest_distances,
    surprisal,
)

H, W, C = 4, 4, 8


def _features(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, W, C, generator=g) + shift


def _fitted(size: int = 64, **kwargs: object) -> PatchMemory:
    memory = PatchMemory(C, size, top_k=2, router_size=16, **kwargs)
    memory.add_task("0")
    memory.fit("0", [_features(10, 0), _features(6, 1)], lambda f: f[..., 0])
    return memory


def test_nearest_distances_match_brute_force_and_exclusion() -> None:
    x, bank = torch.randn(50, C), torch.randn(30, C)
    expected = torch.cdist(x, bank).min(dim=1).values
    torch.testing.assert_close(nearest_distances(x, bank, chunk=7), expected, rtol=1e-4, atol=1e-4)
    groups, bank_groups = torch.arange(50) % 3, torch.arange(30) % 3
    excluded = nearest_distances(x, bank, exclude=(groups, bank_groups))
    full = torch.cdist(x, bank)
    full[groups[:, None] == bank_groups[None]] = float("inf")
    torch.testing.assert_close(excluded, full.min(dim=1).values, rtol=1e-4, atol=1e-4)


def test_surprisal_is_monotone_finite_and_grows_slowly_beyond_training() -> None:
    reference = torch.arange(1.0, 101.0)  # 1..100
    values = torch.tensor([-5.0, 1.0, 50.0, 50.5, 100.0, 101.0, 200.0])
    s = surprisal(values, reference)
    assert torch.isfinite(s).all()
    assert (s[1:] >= s[:-1]).all()
    # at or under the smallest training value: the count of values <= it, 1 of 100
    floor = -math.log(100 / 101)
    assert s[0].item() == pytest.approx(floor, rel=1e-5) and s[1].item() == pytest.approx(floor, rel=1e-5)
    # 50 of the 100 reference values are at most 50: (100 - 50 + 1) / (100 + 1); half-way to 51, 50.5
    assert s[2].item() == pytest.approx(-math.log(51 / 101), rel=1e-5)
    assert s[3].item() == pytest.approx(-math.log(50.5 / 101), rel=1e-5)
    cap = -math.log(1 / 101)
    assert s[4].item() == pytest.approx(cap, rel=1e-5)  # the largest training value meets the rise beyond it
    spread = 100.0 - 51.0
    assert s[6].item() == pytest.approx(cap + BEYOND_SLOPE * 100.0 / spread, rel=1e-5)


def test_surprisal_moves_only_as_much_as_its_input_at_repeated_training_values() -> None:
    """The reference repeats values (training had fewer patches than it keeps): a score within
    rounding of one of them, as on a training image, gets the surprisal of that value."""
    reference = torch.arange(1.0, 101.0).repeat_interleave(5)  # 1..100, each 5 times
    values = torch.arange(1.0, 101.0)
    s = surprisal(values, reference)
    for nudge in (1 + 1e-6, 1 - 1e-6):
        assert (surprisal(values * nudge, reference) - s).abs().max() < 1e-3
    # between training values the count rises linearly, to the repeats of the next one
    assert surprisal(torch.tensor([50.5]), reference).item() == pytest.approx(-math.log((500 - 252.5 + 1) / 501), rel=1e-5)
    fine = torch.linspace(0.0, 110.0, 5001)
    assert (surprisal(fine, reference).diff() >= 0).all()


def test_a_patch_of_the_memory_is_at_distance_zero() -> None:
    """The distance comes from the difference to the nearest row: exact for a patch of the memory,
    where ``|x|^2 - 2 x.b + |b|^2`` leaves only rounding noise (whose square root is far from 0)."""
    g = torch.Generator().manual_seed(0)
    bank = 20.0 + 3.0 * torch.randn(64, 152, generator=g)  # features far from the origin, as a backbone's
    x = torch.cat([bank[:16], bank[:16] + 1e-3])
    d = nearest_distances(x, bank)
    assert torch.equal(d[:16], torch.zeros(16))
    torch.testing.assert_close(d[16:], torch.full((16,), 1e-3 * 152**0.5), rtol=1e-2, atol=0)
    excluded = nearest_distances(x, bank, exclude=(torch.zeros(32, dtype=torch.long), torch.ones(64, dtype=torch.long)))
    assert torch.equal(excluded, d)


def test_fit_fills_the_memory_and_references() -> None:
    memory = _fitted()
    state = memory.tasks["0"]
    assert memory.fitted("0")
    assert state.bank.shape == (64, C)
    for name in ("distance_reference", "map_reference"):
        reference = getattr(state, name)
        assert reference.shape == (REFERENCE_SIZE,) and (reference[1:] >= reference[:-1]).all()
    # the memory holds training patches: each memory row is one of them
    train = torch.cat([_features(10, 0), _features(6, 1)]).reshape(-1, C)
    assert (state.bank[:, None] == train[None]).all(dim=-1).any(dim=1).all()
    assert state.image_stats[1] > 0 and state.routing_calibration > 0


def test_more_memory_than_patches_repeats_them() -> None:
    memory = _fitted(size=1000)  # 16 images x 16 patches = 256 patches
    bank = memory.tasks["0"].bank
    assert bank.shape == (1000, C)
    assert torch.equal(bank[:256].sort(dim=0).values, bank[256:512].sort(dim=0).values)


def test_position_embedding_is_removed_before_matching() -> None:
    position = torch.randn(H, W, C)
    shifted = PatchMemory(C, 64, top_k=2, router_size=16, position_embedding=position)
    shifted.add_task("0")
    shifted.fit("0", [_features(10, 0) + position, _features(6, 1) + position], lambda f: f[..., 0])
    plain = _fitted()
    torch.testing.assert_close(shifted.tasks["0"].bank.sort(dim=0).values, plain.tasks["0"].bank.sort(dim=0).values)
    test = _features(3, 5)
    torch.testing.assert_close(shifted.distances("0", test + position), plain.distances("0", test), rtol=1e-4, atol=1e-4)


def test_anomalous_patches_score_higher_in_map_image_and_routing() -> None:
    memory = _fitted()
    normal, odd = _features(4, 7), _features(4, 8)
    odd[:, 1, 1] += 6.0  # one patch per image far from every training patch
    d_normal, d_odd = memory.distances("0", normal), memory.distances("0", odd)
    assert (d_odd[:, 1, 1] > d_normal.max()).all()
    fused_odd = memory.fuse_map("0", odd[..., 0], d_odd)
    assert (fused_odd[:, 1, 1] > memory.fuse_map("0", normal[..., 0], d_normal).amax(dim=(1, 2))).all()
    assert (memory.image_z("0", d_odd) > memory.image_z("0", d_normal).max()).all()
    # one odd patch in 16 does not move the median routing score much; a whole other product does
    other = _features(4, 9, shift=5.0)
    assert (memory.routing_score("0", other) > 2 * memory.routing_score("0", odd).max()).all()


def test_routing_uses_the_first_router_size_patches() -> None:
    memory = _fitted()
    test = _features(2, 3)
    expected = memory.distances("0", test, size=16).flatten(1).median(dim=1).values
    torch.testing.assert_close(memory.routing_score("0", test), expected)


def test_state_dict_round_trip_creates_fitted_tasks() -> None:
    memory = _fitted()
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    loaded = PatchMemory(C, 64, top_k=2, router_size=16)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.fitted("0")
    test = _features(2, 4)
    assert torch.equal(loaded.distances("0", test), memory.distances("0", test))


def test_too_few_images_is_an_error_naming_the_task() -> None:
    memory = PatchMemory(C, 8)
    with pytest.raises(ValueError, match="task '3'"):
        memory.fit("3", [_features(1, 0)], lambda f: f[..., 0])


@pytest.mark.parametrize("n", [1, 2, 7, 64, 255, 256])
def test_patch_quantile_at_one_half_is_torch_median_and_lower_quantiles_ignore_a_large_minority(n: int) -> None:
    from anomalib_moleflow.models.moleflow.task_statistics.patch_memory import patch_quantile

    values = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(patch_quantile(values, 0.5), values.median(dim=1).values)
    assert torch.equal(patch_quantile(values, 1.0), values.max(dim=1).values)
    if n >= 64:  # 40% of the patches far off ("a large defect"): the lower quartile does not move
        moved = values.clone()
        order = values.argsort(dim=1, descending=True)[:, : int(0.4 * n)]
        moved.scatter_(1, order, 100.0)
        assert torch.equal(patch_quantile(moved, 0.25), patch_quantile(values, 0.25))
        assert not torch.equal(patch_quantile(moved, 0.75), patch_quantile(values, 0.75))


def test_router_quantile_sets_the_routing_score_and_its_calibration() -> None:
    torch.manual_seed(0)
    train = [torch.randn(6, 4, 4, 3)]
    median, quartile = PatchMemory(3, 32, router_quantile=0.5), PatchMemory(3, 32, router_quantile=0.25)
    for memory in (median, quartile):
        memory.fit("0", train, lambda f: f.sum(-1))
    x = torch.randn(2, 4, 4, 3)
    d = median.distances("0", x, median.router_size).flatten(1)
    assert torch.equal(median.routing_score("0", x), d.median(dim=1).values)
    assert torch.all(quartile.routing_score("0", x) <= median.routing_score("0", x))
    assert quartile.routing_calibration("0") < median.routing_calibration("0")
