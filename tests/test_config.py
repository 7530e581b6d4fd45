import pytest

from detkd.config import load_params, parse_params
from detkd.errors import ConfigError

from conftest import REPO


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.backbone != params.student.backbone or params.teacher.weights


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train_teacher.lrr'.*allowed keys here:.*\blr\b"):
        parse_params({"train_teacher": {"lrr": 0.1}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train_student.epochs: .*integer.*'ten'"):
        parse_params({"train_student": {"epochs": "ten"}})


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"train_teacher.lr: .*greater than 0.*-0.1"):
        parse_params({"train_teacher": {"lr": -0.1}})


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match=r"student.backbone: .*'resnet18'.*'mobilenet_v3_large'.*resnet19"):
        parse_params({"student": {"backbone": "resnet19"}})


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="min_object_size"):
        parse_params({"data": {"synthetic": {"min_object_size": 50.0, "max_object_size": 20.0}}})


def test_coco_source_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        parse_params({"data": {"source": "coco"}})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_error_is_one_line():
    with pytest.raises(ConfigError) as info:
        parse_params({"model": {"family": "yolo"}})
    assert "\n" not in str(info.value) and "fasterrcnn" in str(info.value)


def test_stage_seed_is_optional_and_non_negative():
    assert parse_params({}).train_student.seed is None
    assert parse_params({"train_student": {"seed": 3}}).train_student.seed == 3
    with pytest.raises(ConfigError, match=r"train_student.seed: .*greater than or equal to 0"):
        parse_params({"train_student": {"seed": -1}})
