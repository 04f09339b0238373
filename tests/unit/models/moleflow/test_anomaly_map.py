"""Anomaly map upsampling/smoothing and image score."""

import torch

from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator


def test_map_shape_finite_and_peak_location() -> None:
    gen = AnomalyMapGenerator((64, 64), sigma=2.0, top_k=3)
    scores = torch.zeros(2, 8, 8)
    scores[1, 2, 5] = 10.0
    amap = gen(scores)
    assert amap.shape == (2, 1, 64, 64)
    assert torch.isfinite(amap).all()
    peak = divmod(int(amap[1, 0].argmax()), 64)
    assert abs(peak[0] - (2 * 8 + 4)) <= 4 and abs(peak[1] - (5 * 8 + 4)) <= 4
    assert torch.allclose(amap[0], torch.zeros_like(amap[0]))


def test_image_score_is_top_k_mean() -> None:
    gen = AnomalyMapGenerator((16, 16), sigma=0.0, top_k=2)
    scores = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])
    assert torch.allclose(gen.image_score(scores), torch.tensor([4.0]))


def test_separable_blur_equals_anomalib_2d_gaussian() -> None:
    from anomalib.models.components import GaussianBlur2d

    from anomalib_moleflow.models.moleflow.anomaly_map import SeparableGaussianBlur

    maps = torch.rand(2, 1, 40, 48)
    ours = SeparableGaussianBlur(sigma=4.0, kernel_size=33)(maps)
    reference = GaussianBlur2d(sigma=(4.0, 4.0), channels=1, kernel_size=(33, 33))(maps)
    assert ours.shape == maps.shape
    assert torch.allclose(ours, reference, atol=1e-5)


def test_zero_sigma_disables_smoothing_and_maps_are_bilinear_upsamples() -> None:
    gen = AnomalyMapGenerator((16, 16), sigma=0.0, top_k=2)
    assert gen.blur is None
    scores = torch.rand(2, 4, 4)
    expected = torch.nn.functional.interpolate(scores[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(gen(scores), expected)
    # the kernel covers +-4 sigma
    assert AnomalyMapGenerator((64, 64), sigma=4.0).blur.kernel.shape[-1] == 2 * int(4.0 * 4.0 + 0.5) + 1


def test_smoothing_keeps_constant_maps_and_the_total_mass() -> None:
    gen = AnomalyMapGenerator((32, 32), sigma=2.0)
    const = torch.full((1, 4, 4), 3.0)
    assert torch.allclose(gen(const), torch.full((1, 1, 32, 32), 3.0), atol=1e-5)
    kernel = gen.blur.kernel
    assert torch.allclose(kernel.sum(), torch.tensor(1.0))
    assert "kernel" not in gen.state_dict()  # recomputed from the config, not saved
