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


@pytest.mark.fault
def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.fault
@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b"seed: 1\nmodel: {}\nseed: 2\n", "line 3, column 1: not valid YAML: key 'seed' appears twice \\(lines 1 and 3\\)"),
    (b"train_student:\n  epochs: 3\n  epochs: 4\n", "key 'epochs' appears twice"),
    (b"seed: [1, 2\n", "line 2, column 1: not valid YAML"),
    (b"seed: 1  # caf\xe9\n", "not UTF-8 text \\(byte 0xe9 at offset 14\\)"),
    (b"train_student:\n  lr: 1e-3\n", "train_student.lr: .* write 0.001"),
])
def test_params_file_mistakes_get_one_line_naming_the_place(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as info:
        load_params(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.fault
def test_error_is_one_line():
    with pytest.raises(ConfigError) as info:
        parse_params({"model": {"family": "yolo"}})
    assert "\n" not in str(info.value) and "fasterrcnn" in str(info.value)


def test_stage_seed_is_optional_and_non_negative():
    assert parse_params({}).train_student.seed is None
    assert parse_params({"train_student": {"seed": 3}}).train_student.seed == 3
    with pytest.raises(ConfigError, match=r"train_student.seed: .*greater than or equal to 0"):
        parse_params({"train_student": {"seed": -1}})


# ---- per-role architecture --------------------------------------------------------------------------

def test_roles_build_different_architectures_and_family_sections_are_independent():
    params = parse_params({"teacher": {"backbone": "resnet34", "fpn_channels": 128},
                           "student": {"backbone": "mobilenet_v3_small", "fpn_channels": 48, "detections_per_image": 20,
                                       "fasterrcnn": {"representation_size": 64, "rpn_post_nms_top_n_test": 50},
                                       "retinanet": {"head_depth": 2, "topk_candidates": 200}}})
    teacher, student = params.detector_config("teacher"), params.detector_config("student")
    assert (teacher.fpn_channels, teacher.representation_size) == (128, 256)
    assert (student.fpn_channels, student.representation_size, student.rpn_post_nms_top_n_test) == (48, 64, 50)
    assert student.detections_per_image == 20 and student.min_size == teacher.min_size  # input stays shared
    retina = parse_params({"model": {"family": "retinanet"}, "student": params.student.model_dump()})
    assert (retina.detector_config("student").head_depth, retina.detector_config("student").topk_candidates) == (2, 200)


@pytest.mark.parametrize("raw, pattern", [
    ({"model": {"fpn_channels": 64}}, r"unknown key 'model.fpn_channels'.*set per role: teacher.fpn_channels / student.fpn_channels"),
    ({"student": {"backbone": "resnet18", "representation_size": 64}},
     r"unknown key 'student.representation_size'.*architecture key of fasterrcnn.*student.fasterrcnn.representation_size"),
    ({"student": {"backbone": "resnet18", "fasterrcnn": {"head_depth": 2}}},
     r"unknown key 'student.fasterrcnn.head_depth'; allowed keys here: box_batch_size_per_image, .*student.retinanet.head_depth"),
    ({"teacher": {"backbone": "resnet18", "retinanet": {"head_depth": 6}}}, r"teacher.retinanet.head_depth: .*less than or equal to 4.*6"),
    ({"student": {"backbone": "resnet18", "fpn_channels": 4}}, r"student.fpn_channels: .*greater than or equal to 8.*4"),
    ({"student": {"backbone": "resnet18", "fasterrcnn": {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 300}}},
     r"student.fasterrcnn: rpn_post_nms_top_n_test \(300\) must be <= rpn_pre_nms_top_n_test \(100\)"),
    ({"frontier": {"sizes": {"tiny": {"fpn_channels": 2}}}}, r"frontier.sizes.tiny.fpn_channels: .*greater than or equal to 8"),
    ({"frontier": {"sizes": {"tiny": {"fasterrcnn": {"head_depth": 2}}}}},
     r"frontier.sizes.tiny.fasterrcnn.head_depth: unknown key.*student.retinanet.head_depth"),
    ({"frontier": {"sizes": {"Tiny One": {}}}}, r"size name 'Tiny One' must be lower-case"),
])
def test_bad_architecture_keys_get_one_line_naming_key_and_allowed_values(raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        parse_params(raw)
    assert "\n" not in str(info.value)


def test_repository_student_is_cheaper_than_its_teacher():
    params = load_params(REPO / "params.yaml")
    teacher, student = params.detector_config("teacher"), params.detector_config("student")
    assert student.fpn_channels < teacher.fpn_channels
    assert student.rpn_post_nms_top_n_test < teacher.rpn_post_nms_top_n_test
    assert set(params.frontier.sizes) == {"small", "large"}


def test_export_precisions_tolerances_and_moved_keys():
    p = parse_params({"export": {"gate": {"max_ap_drop": 0.02}}})  # one number sets every precision
    assert (p.export.gate.max_ap_drop.fp32, p.export.gate.max_ap_drop.fp16, p.export.gate.max_ap_drop.int8) == (0.02,) * 3
    p = parse_params({})
    assert p.export.precisions == ["fp32", "fp16", "int8"] and p.export.gate.max_ap_drop.int8 == 0.01
    assert p.export.quantize.calibration_images == 64 and p.export.gate.runtimes == ["onnxruntime", "openvino"]
    with pytest.raises(ConfigError, match=r"export.precisions \['int8'\] must include fp32"):
        parse_params({"export": {"precisions": ["int8"]}})
    with pytest.raises(ConfigError, match=r"unknown key 'export.tensorrt.precisions'.*it moved to export.precisions"):
        parse_params({"export": {"tensorrt": {"precisions": ["fp16"]}}})
    with pytest.raises(ConfigError, match=r"unknown key 'export.tensorrt.calibration_images'.*export.quantize.calibration_images"):
        parse_params({"export": {"tensorrt": {"calibration_images": 8}}})
    with pytest.raises(ConfigError, match=r"export.gate.runtimes"):
        parse_params({"export": {"gate": {"runtimes": ["tflite"]}}})
