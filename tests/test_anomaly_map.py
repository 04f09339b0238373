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
