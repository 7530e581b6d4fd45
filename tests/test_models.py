import pytest
import torch

from detkd.config import BACKBONES, ModelConfig
from detkd.errors import CheckpointError, ConfigError
from detkd.models.builder import DetectorSpec, build_detector, make_spec

TINY = ModelConfig(min_size=64, max_size=64, fpn_channels=32, representation_size=32, box_batch_size_per_image=16,
                   rpn_post_nms_top_n_train=50, rpn_post_nms_top_n_test=50)


def _batch(n_boxes: int):
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]])[:n_boxes]
    targets = [{"boxes": boxes.clone(), "labels": torch.arange(1, n_boxes + 1)} for _ in images]
    return images, targets


@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_builds_trains_and_predicts(family, backbone):
    torch.manual_seed(0)
    model = build_detector(make_spec(family, backbone, 3, TINY))
    model.train()
    losses = model(*_batch(2))
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 256, 256))
        out = model([torch.rand(3, 64, 64)])
    strides = [256 // f.shape[-1] for f in features.values()]
    assert strides == ([4, 8, 16, 32, 64] if family == "fasterrcnn" else [8, 16, 32, 64, 128])
    assert all(f.shape[1] == 32 for f in features.values())
    assert set(out[0]) == {"boxes", "labels", "scores"}


@pytest.mark.parametrize("family", ["fasterrcnn", "retinanet"])
def test_image_without_boxes_gives_zero_box_loss(family):
    torch.manual_seed(0)
    model = build_detector(make_spec(family, "resnet18", 3, TINY)).train()
    images, targets = _batch(0)
    losses = model(images, targets)
    box_terms = [k for k in losses if "box" in k or "regression" in k]
    assert box_terms and all(losses[k].item() == 0.0 for k in box_terms)


def test_unknown_backbone_and_family():
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'; choose one of: resnet18"):
        make_spec("fasterrcnn", "vgg16", 3, TINY)
    with pytest.raises(ConfigError, match="unknown detector family 'yolo'"):
        make_spec("yolo", "resnet18", 3, TINY)


def test_local_weights_load_and_mismatch(tmp_path):
    spec = make_spec("retinanet", "resnet18", 3, TINY)
    model = build_detector(spec)
    torch.save(model.state_dict(), tmp_path / "det.pt")
    again = build_detector(spec, weights=str(tmp_path / "det.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = make_spec("retinanet", "resnet18", 5, TINY)
    with pytest.raises(CheckpointError, match="does not fit a retinanet/resnet18 detector with 5 classes"):
        build_detector(other, weights=str(tmp_path / "det.pt"))
    backbone_state = {f"{k}": v for k, v in model.backbone.body.state_dict().items()}
    torch.save(backbone_state, tmp_path / "bb.pt")
    build_detector(spec, backbone_weights=str(tmp_path / "bb.pt"))
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="broken.pt: not a readable checkpoint"):
        build_detector(spec, weights=str(tmp_path / "broken.pt"))


def test_spec_round_trip():
    spec = make_spec("fasterrcnn", "resnet34", 4, TINY)
    assert DetectorSpec.from_dict(spec.to_dict()) == spec
