"""The exposing forwards compute exactly the losses of torchvision's own forward."""

import pytest
import torch

from detkd.models.builder import build_detector, make_spec
from detkd.models.view import roi_head_outputs, train_forward, transform_batch

from test_models import TINY, _batch


@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet"])
def test_view_matches_torchvision_forward(family):
    torch.manual_seed(0)
    model = build_detector(make_spec(family, "resnet18", 3, TINY)).train()
    images, targets = _batch(2)
    torch.manual_seed(1)
    reference = model(images, [dict(t) for t in targets])
    torch.manual_seed(1)
    batch, resized = transform_batch(model, images, [dict(t) for t in targets])
    out = train_forward(model, batch, resized)
    assert set(out.losses) == set(reference)
    for k in reference:
        torch.testing.assert_close(out.losses[k], reference[k])
    assert list(out.features) == list(model.backbone(batch.tensors))
    if family == "fasterrcnn":
        n = sum(len(r) for r in out.rois)
        assert out.roi_features.shape == (n, 32, 7, 7) and out.class_logits.shape == (n, 4)
        assert all((lab >= 0).all() for lab in out.roi_labels)
        pooled, logits, _ = roi_head_outputs(model, out.features, out.rois, batch.image_sizes)
        torch.testing.assert_close(logits, out.class_logits)
    else:
        assert len(out.matched_idxs) == 2 and out.matched_idxs[0].shape[0] == out.dense.anchors[0].shape[0]
    assert out.dense.logits.shape[:2] == out.dense.deltas.shape[:2] == (2, out.dense.anchors[0].shape[0])
    assert sum(out.dense.num_per_level) == out.dense.anchors[0].shape[0]
