"""The per-task patch memory: nearest distances, surprisal fusion, image z-score, routing score,
fitting and state dicts, on synthetic patch features."""

from __future__ import annotations

import io

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
    values = torch.tensor([-5.0, 1.0, 50.0, 100.0, 101.0, 200.0])
    s = surprisal(values, reference)
    assert torch.isfinite(s).all()
    assert (s[1:] >= s[:-1]).all() and s[0] == 0.0
    # 51 of the 100 reference values are at or above 50: (51 + 1) / (100 + 1)
    assert s[2] == pytest.approx(-torch.log(torch.tensor(52 / 101)).item(), rel=1e-5)
    cap = -torch.log(torch.tensor(1 / 101)).item()
    spread = 100.0 - 51.0
    assert s[5].item() == pytest.approx(cap + BEYOND_SLOPE * 100.0 / spread, rel=1e-5)


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
