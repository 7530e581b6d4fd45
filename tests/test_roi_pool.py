"""The gather RoIAlign used by DSIG and GID equals torchvision's, forward and backward."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detkd.distill.roi_pool import GatherMultiScaleRoIAlign, WeightedGather, roi_align_gather


def _random_boxes(gen: torch.Generator, n: int, size: float) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size * 1.1 - size * 0.05
    wh = torch.rand(n, 2, generator=gen) * size * 0.6 + 0.2
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("output_size, sampling_ratio, scale", [(7, 2, 0.25), ((5, 3), 1, 0.5), (10, 3, 0.125)])
def test_roi_align_gather_equals_torchvision(output_size, sampling_ratio, scale):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 6, 11, 13, generator=gen)
    boxes = _random_boxes(gen, 40, 13 / scale)
    # the edge cases of torchvision's bilinear sampling: outside the map, across its border, sub-pixel boxes
    boxes = torch.cat([boxes, torch.tensor([[-40.0, -40.0, -20.0, -20.0], [-3.0, -3.0, 2.0, 2.0],
                                            [0.0, 0.0, 13 / scale, 11 / scale], [5.0, 5.0, 5.2, 5.1],
                                            [12 / scale, 10 / scale, 14 / scale, 12 / scale]])])
    rois = torch.cat([torch.randint(0, 3, (len(boxes), 1), generator=gen).float(), boxes], dim=1)

    a = features.clone().requires_grad_()
    b = features.clone().requires_grad_()
    expected = roi_align(a, rois, output_size, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=False)
    got = roi_align_gather(b, rois, output_size, scale, sampling_ratio)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn(expected.shape, generator=gen)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)


def test_multiscale_gather_equals_torchvision_on_every_level():
    gen = torch.Generator().manual_seed(1)
    names = ["p2", "p3", "p4", "p5", "p6"]
    feats = {n: torch.randn(2, 4, 64 >> i, 64 >> i, generator=gen) for i, n in enumerate(names)}
    boxes = [_random_boxes(gen, 60, 256).clamp(0, 256) for _ in range(2)]
    boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]
    sizes = [(256, 256)] * 2
    ref, fast = MultiScaleRoIAlign(names, 7, 2), GatherMultiScaleRoIAlign(names, 7, 2)
    for pooler in (ref, fast):
        pooler.canonical_scale = 32  # spreads these boxes over all five levels
    ref(feats, boxes, sizes)  # sets up the level mapper
    levels = ref.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3, 4}

    leaves_a = {k: v.clone().requires_grad_() for k, v in feats.items()}
    leaves_b = {k: v.clone().requires_grad_() for k, v in feats.items()}
    expected, got = ref(leaves_a, boxes, sizes), fast(leaves_b, boxes, sizes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=gen)
    expected.backward(grad)
    got.backward(grad)
    for k in names:
        torch.testing.assert_close(leaves_b[k].grad, leaves_a[k].grad, rtol=1e-5, atol=1e-5)


def test_weighted_gather_gradient_is_the_transpose():
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.randint(0, 9, (5, 4), generator=gen)
    weight = torch.rand(5, 4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda t: WeightedGather.apply(t, index, weight), (table,))


def test_gather_refuses_adaptive_sampling_and_handles_no_boxes():
    features = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        roi_align_gather(features, torch.zeros(1, 5), 2, 1.0, 0)
    assert roi_align_gather(features, torch.zeros(0, 5), 3, 1.0, 2).shape == (0, 2, 3, 3)
    pooler = GatherMultiScaleRoIAlign(["p2", "p3"], 3, 2)
    out = pooler({"p2": torch.randn(1, 2, 8, 8), "p3": torch.randn(1, 2, 4, 4)}, [torch.zeros(0, 4)], [(32, 32)])
    assert out.shape == (0, 2, 3, 3)
