import pytest
import torch

from detkd.config import BACKBONES, DetectorConfig
from detkd.errors import CheckpointError, ConfigError
from detkd.models.builder import DetectorSpec, build_detector, make_spec

TINY = DetectorConfig(min_size=64, max_size=64, fpn_channels=32, representation_size=32, box_batch_size_per_image=16,
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
    assert strides == [4, 8, 16, 32, 64]  # both families on P2-P6 by default (model.retinanet_levels)
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


def test_architecture_keys_reach_the_built_detector():
    cfg = TINY.model_copy(update={"fpn_channels": 16, "representation_size": 24, "rpn_pre_nms_top_n_test": 40,
                                  "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 8, "detections_per_image": 7,
                                  "head_depth": 2, "topk_candidates": 123})
    two = build_detector(make_spec("fasterrcnn", "mobilenet_v3_small", 3, cfg))
    assert two.backbone.out_channels == 16 and two.roi_heads.box_head.fc7.out_features == 24
    assert two.rpn._pre_nms_top_n["testing"] == 40 and two.rpn._post_nms_top_n["testing"] == 20
    assert two.roi_heads.fg_bg_sampler.batch_size_per_image == 8 and two.roi_heads.detections_per_img == 7
    one = build_detector(make_spec("retinanet", "mobilenet_v3_small", 3, cfg))
    assert len(one.head.classification_head.conv) == 2 and len(one.head.regression_head.conv) == 2
    assert one.topk_candidates == 123 and one.detections_per_img == 7
    one.train()
    losses = one(*_batch(2))
    assert all(torch.isfinite(v) for v in losses.values())


def test_checkpoint_spec_from_before_per_role_keys_still_builds():
    """Checkpoints written before head_depth/topk_candidates existed rebuild with torchvision's defaults."""
    spec = make_spec("retinanet", "resnet18", 3, TINY).to_dict()
    for key in ("head_depth", "topk_candidates", "retinanet_levels", "freeze_pretrained"):
        del spec["model"][key]
    spec["model"]["family"] = "retinanet"  # the old shared section was stored whole
    model = build_detector(DetectorSpec.from_dict(spec))
    assert len(model.head.classification_head.conv) == 4 and model.topk_candidates == 1000
    assert list(model.backbone(torch.rand(1, 3, 64, 64))) == ["0", "1", "2", "p6", "p7"]  # built on P3-P7 then


@pytest.mark.parametrize("levels, names, strides, roi_levels", [
    ("p2-p6", ["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], ["0", "1", "2", "3"]),
    ("p3-p7", ["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], ["0", "1", "2", "p6", "p7"]),
])
def test_retinanet_pyramid_levels(levels, names, strides, roi_levels):
    """model.retinanet_levels picks the maps the head runs on; anchors and RoI pooling follow them."""
    cfg = TINY.model_copy(update={"retinanet_levels": levels, "min_size": 128, "max_size": 128})
    model = build_detector(make_spec("retinanet", "resnet18", 3, cfg)).eval()
    features = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == names
    assert [128 // f.shape[-1] for f in features.values()] == strides
    assert model.roi_levels == roi_levels
    with torch.no_grad():
        assert len(model([torch.rand(3, 128, 128)])) == 1  # anchors match the number of maps


@pytest.mark.parametrize("backbone", ["regnet_x_400mf", "mobilenet_v3_small"])
def test_deployment_backbones_take_classification_weights(backbone, tmp_path):
    """A torchvision classification state dict (e.g. ImageNet weights saved locally) loads into the detector's
    backbone; its classifier keys are ignored."""
    import torchvision

    net = getattr(torchvision.models, backbone)(weights=None)
    with torch.no_grad():
        next(iter(net.parameters())).fill_(0.123)
    torch.save(net.state_dict(), tmp_path / "cls.pt")
    model = build_detector(make_spec("fasterrcnn", backbone, 3, TINY), backbone_weights=str(tmp_path / "cls.pt"))
    first = next(iter(model.backbone.body.parameters()))
    assert torch.all(first == 0.123)
    bn = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.momentum == 0.1 for m in bn)  # see builder: MobileNet's 0.01 is raised to 0.1


@pytest.mark.parametrize("backbone, first", [("resnet18", "body.layer1."), ("mobilenet_v3_small", "body.0."),
                                             ("regnet_x_400mf", "body.block1.")])
def test_a_pretrained_backbone_is_fine_tuned_frozen(backbone, first, tmp_path):
    """With backbone weights (and freeze_pretrained), BatchNorm keeps its statistics and the stem and first
    stage do not train; the state dict is the same as an unfrozen detector's, so checkpoints load either way."""
    import torchvision

    torch.save(getattr(torchvision.models, backbone)(weights=None).state_dict(), tmp_path / "cls.pt")
    spec = make_spec("retinanet", backbone, 3, TINY)
    frozen = build_detector(spec, backbone_weights=str(tmp_path / "cls.pt")).train()
    scratch = build_detector(spec)
    assert frozen.state_dict().keys() == scratch.state_dict().keys()
    trainable = {n for n, p in frozen.backbone.named_parameters() if p.requires_grad}
    assert not any(n.startswith(first) for n in trainable) and any(n.startswith("fpn.") for n in trainable)
    bn = [m for m in frozen.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    frozen(*_batch(2))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bn))  # statistics kept in train mode
    unfrozen = build_detector(make_spec("retinanet", backbone, 3, TINY.model_copy(update={"freeze_pretrained": False})),
                              backbone_weights=str(tmp_path / "cls.pt"))
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())
