"""The pretrain stage: its images, the classifier it trains, and how training finds the file."""

import json

import pytest
import torch

from detkd.config import PretrainConfig, SyntheticConfig, parse_params
from detkd.data.synthetic import render_image
from detkd.errors import ConfigError
from detkd.models.builder import build_detector, make_spec
from detkd.pretrain import (MANIFEST, ObjectImages, check_pretrain_source, crop_config, pretrain_backbone,
                            pretrained_backbone_path, roles_to_pretrain)

DATA = SyntheticConfig()


def test_object_images_have_one_object_and_are_reproducible():
    crops = crop_config(DATA, 48)
    assert crops.image_size == 48 and crops.max_objects == 1 and crops.empty_fraction == 0
    assert crops.max_object_size <= 36
    images = ObjectImages(crops, seed=3, length=20)
    labels = [images[i][1] for i in range(20)]
    assert set(labels) <= set(range(DATA.num_classes)) and len(set(labels)) > 1
    assert torch.equal(images[5][0], ObjectImages(crops, seed=3, length=20)[5][0])
    for i in range(5):  # exactly one object each, from a stream no detection split uses
        pixels, anns = render_image(crops, 3, "pretrain", i)
        assert len(anns) == 1 and pixels.shape == (48, 48, 3)
        train_pixels, _ = render_image(crops, 3, "train", i)
        assert not (pixels == train_pixels).all()


def test_pretrained_classifier_loads_into_the_detector_backbone(tmp_path):
    cfg = PretrainConfig(iterations=3, batch_size=4, image_size=32, workers=0)
    state, report = pretrain_backbone("resnet18", cfg, DATA, seed=0)
    assert report["iterations"] == 3 and 0.0 <= report["held_out_accuracy"] <= 1.0
    again, _ = pretrain_backbone("resnet18", cfg, DATA, seed=0)
    assert all(torch.equal(state[k], again[k]) for k in state)  # same seed, same weights
    path = str(tmp_path / "r18.pt")
    torch.save(state, path)
    from detkd.config import DetectorConfig

    model = build_detector(make_spec("retinanet", "resnet18", 4, DetectorConfig(fpn_channels=32)), backbone_weights=path)
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])


def test_training_finds_the_role_file(tmp_path):
    with pytest.raises(ConfigError, match="pretrain.json: missing"):
        pretrained_backbone_path(tmp_path, "teacher", "resnet34")
    (tmp_path / MANIFEST).write_text(json.dumps({"enabled": True, "roles": {
        "teacher": {"file": "teacher_backbone.pt", "backbone": "resnet34"}}}))
    assert pretrained_backbone_path(tmp_path, "teacher", "resnet34") == str(tmp_path / "teacher_backbone.pt")
    assert pretrained_backbone_path(tmp_path, "student", "mobilenet_v3_large") is None
    assert pretrained_backbone_path(None, "teacher", "resnet34") is None
    with pytest.raises(ConfigError, match="pretrained as 'resnet34', params say 'resnet18'"):
        pretrained_backbone_path(tmp_path, "teacher", "resnet18")


def test_which_roles_are_pretrained(tmp_path):
    params = parse_params({"student": {"backbone": "resnet18", "backbone_weights": "imagenet.pt"}})
    assert roles_to_pretrain(params) == ["teacher"]
    assert roles_to_pretrain(parse_params({"pretrain": {"enabled": False}})) == []
    coco = parse_params({"data": {"source": "coco", "root": str(tmp_path)}})
    with pytest.raises(ConfigError, match="set pretrain.enabled: false and give ImageNet weights"):
        check_pretrain_source(coco)
