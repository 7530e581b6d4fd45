"""Stage entries turn user mistakes into one-line errors (exit status 2) and leave earlier outputs intact."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from detkd.config import deep_merge
from detkd.smoke import SMOKE_OVERRIDES

from conftest import REPO


def _stage(script, *args, cwd):
    env = {**os.environ, "DETKD_TRACKING": "off"}
    return subprocess.run([sys.executable, str(REPO / "pipeline" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _params(tmp_path, overrides):
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.fault
@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"train_teacher": {"epoch": 3}}, ["unknown key 'train_teacher.epoch'", "epochs"]),
        ({"student": {"backbone": "resnet9"}}, ["student.backbone", "resnet9", "mobilenet_v3_large"]),
        ({"train_student": {"batch_size": 0}}, ["train_student.batch_size", "greater than or equal to 1"]),
        ({"seed": "one"}, ["seed", "integer"]),
    ],
)
def test_params_mistakes(tmp_path, overrides, fragments):
    params = _params(tmp_path, overrides)
    proc = _stage("prepare.py", "--params", str(params), "--out", "data/prepared", cwd=tmp_path)
    _assert_one_line_error(proc, str(params), *fragments)
    assert not (tmp_path / "data").exists()


@pytest.mark.fault
def test_failed_prepare_keeps_previous_output(tmp_path):
    good = _params(tmp_path, SMOKE_OVERRIDES)
    assert _stage("prepare.py", "--params", str(good), cwd=tmp_path).returncode == 0
    manifest = (tmp_path / "data/prepared/dataset.json").read_text()
    bad = _params(tmp_path, {"data": {"source": "coco", "root": str(tmp_path / "no-coco-here")}})
    proc = _stage("prepare.py", "--params", str(bad), cwd=tmp_path)
    _assert_one_line_error(proc, "no-coco-here", "not found")
    assert (tmp_path / "data/prepared/dataset.json").read_text() == manifest


def test_coco_directory_with_a_bad_annotation(tmp_path):
    from conftest import write_coco

    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    write_coco(root / "annotations/instances_train2017.json", [], [], [{"id": 1, "name": "a"}])
    write_coco(root / "annotations/instances_val2017.json", [], [], [])
    params = _params(tmp_path, {"data": {"source": "coco", "root": str(root)}})
    proc = _stage("prepare.py", "--params", str(params), cwd=tmp_path)
    _assert_one_line_error(proc, "instances_val2017.json", "'categories' is empty")


@pytest.mark.fault
@pytest.mark.parametrize("image_bytes, fragment", [(b"\x89PNG\r\n\x1a\n cut short", "not a readable image"),
                                                  (None, "image is 8x6 but")])
def test_prepare_finds_a_corrupt_or_mis_sized_image_before_training(tmp_path, image_bytes, fragment):
    import numpy as np
    from PIL import Image

    from conftest import write_coco

    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / split / name)
    bad = root / "train2017" / "b.png"
    if image_bytes is None:
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(bad)  # the json says 12x10
    else:
        bad.write_bytes(image_bytes)
    images = [{"id": 1, "file_name": "a.png", "width": 12, "height": 10},
              {"id": 2, "file_name": "b.png", "width": 12, "height": 10}]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
                   for i in (1, 2)]
    for split in ("train2017", "val2017"):
        write_coco(root / f"annotations/instances_{split}.json", images, annotations, [{"id": 1, "name": "a"}])
    params = _params(tmp_path, {"data": {"source": "coco", "root": str(root), "dev_fraction": 0.0},
                                "pretrain": {"enabled": False}})
    proc = _stage("prepare.py", "--params", str(params), cwd=tmp_path)
    _assert_one_line_error(proc, "b.png", fragment, "instances_train2017.json")
    assert not (tmp_path / "data/prepared").exists() and not list((tmp_path / "data").iterdir())


@pytest.mark.fault
def test_training_without_prepared_data(tmp_path):
    params = _params(tmp_path, SMOKE_OVERRIDES)
    proc = _stage("train.py", "--role", "teacher", "--params", str(params), "--out", "m.pt", "--history", "h.csv",
                  cwd=tmp_path)
    _assert_one_line_error(proc, "dataset.json", "run the 'prepare' stage first")


@pytest.mark.fault
def test_evaluate_with_corrupt_checkpoint(tmp_path):
    params = _params(tmp_path, SMOKE_OVERRIDES)
    assert _stage("prepare.py", "--params", str(params), cwd=tmp_path).returncode == 0
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    proc = _stage("evaluate.py", "--params", str(params), "--model", "x=bad.pt", cwd=tmp_path)
    _assert_one_line_error(proc, "bad.pt", "not a readable checkpoint")
    assert not (tmp_path / "reports/eval.json").exists()


@pytest.mark.fault
@pytest.mark.parametrize("models, fragment", [(["models/student.pt"], "expected NAME=CHECKPOINT"),
                                             (["a=x.pt", "a=y.pt"], "given twice")])
def test_evaluate_refuses_a_malformed_model_argument(tmp_path, models, fragment):
    args = [arg for m in models for arg in ("--model", m)]
    proc = _stage("evaluate.py", *args, cwd=tmp_path)
    _assert_one_line_error(proc, "--model", fragment)


@pytest.mark.fault
@pytest.mark.parametrize(
    "teacher_bytes, fragments",
    [(None, ["missing-teacher.pt", "checkpoint not found"]), (b"PK\x03\x04truncated", ["missing-teacher.pt", "not a readable checkpoint"])],
)
def test_distill_with_missing_or_corrupt_teacher_fails_before_training(tmp_path, teacher_bytes, fragments):
    params = _params(tmp_path, SMOKE_OVERRIDES)
    assert _stage("prepare.py", "--params", str(params), cwd=tmp_path).returncode == 0
    if teacher_bytes is not None:
        (tmp_path / "missing-teacher.pt").write_bytes(teacher_bytes)
    proc = _stage("train.py", "--role", "student", "--teacher", "missing-teacher.pt", "--params", str(params),
                  "--out", "d.pt", "--history", "d.csv", cwd=tmp_path)
    _assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "d.pt").exists()


def test_distill_bad_hyper_parameter_fails_before_training(tmp_path):
    import torch

    from detkd.engine.checkpoint import save_model_checkpoint
    from detkd.models.builder import build_detector, make_spec
    from detkd.config import parse_params

    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE_OVERRIDES)
    raw = deep_merge(raw, {"distill": {"method": "gid", "fasterrcnn": {"gid": {"topk": 5}}}})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    assert _stage("prepare.py", "--params", str(params_path), cwd=tmp_path).returncode == 0
    p = parse_params(raw)
    spec = make_spec(p.model.family, p.teacher.backbone, 4, p.detector_config("teacher"))
    manifest = json.loads((tmp_path / "data/prepared/dataset.json").read_text())
    save_model_checkpoint(tmp_path / "t.pt", build_detector(spec), {"spec": spec.to_dict(), "category_ids": [1, 3, 5, 7],
                                                                   "category_names": manifest["classes"]})
    proc = _stage("train.py", "--role", "student", "--teacher", "t.pt", "--params", str(params_path),
                  "--out", "d.pt", "--history", "d.csv", cwd=tmp_path)
    _assert_one_line_error(proc, "distill.fasterrcnn.gid", "unknown hyper-parameter 'topk'", "pre_nms_topk")
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.fault
def test_export_refuses_a_checkpoint_trained_on_other_classes_before_writing_anything(tmp_path):
    from detkd.config import parse_params
    from detkd.engine.checkpoint import save_model_checkpoint
    from detkd.models.builder import build_detector, make_spec

    params = _params(tmp_path, SMOKE_OVERRIDES)
    assert _stage("prepare.py", "--params", str(params), cwd=tmp_path).returncode == 0
    p = parse_params(yaml.safe_load(params.read_text()))
    spec = make_spec(p.model.family, p.student.backbone, 4, p.detector_config("student"))
    save_model_checkpoint(tmp_path / "other.pt", build_detector(spec), {"spec": spec.to_dict(), "category_ids": [2, 4, 6, 8],
                                                                       "category_names": ["w", "x", "y", "z"]})
    (tmp_path / "eval.json").write_text(json.dumps({"other": {"AP": 0.1}}))
    proc = _stage("export.py", "--params", str(params), "--model", "other=other.pt", "--eval", "eval.json",
                  "--out-dir", "exported", "--report", "export.json", cwd=tmp_path)
    _assert_one_line_error(proc, "other.pt", "trained on category ids [2, 4, 6, 8]", "the val split has")
    assert not (tmp_path / "exported").exists() and not (tmp_path / "export.json").exists()


@pytest.mark.fault
@pytest.mark.parametrize("content, expected", [
    (None, "no such file; run the evaluate stage first"),
    ("{not json", "not a readable JSON report"),
    ('{"teacher": {"AP": 0.5}}', "no PyTorch AP for ['student'] (has ['teacher'])"),
    ('{"student": {"AP50": 0.5}}', "student.AP must be a number"),
    ('{"student": {"AP": "high"}}', "student.AP must be a number"),
])
def test_the_reference_ap_report_is_checked_in_one_line(tmp_path, content, expected):
    from detkd.errors import ConfigError
    from detkd.evaluation.report import read_model_aps

    path = tmp_path / "eval.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_model_aps(path, ["student"])
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.fault
def test_every_stage_entry_imports_detkd_from_its_own_checkout(tmp_path):
    """A queued DVC experiment runs in a copy of the repository: its stages must run the copy's code, not
    the workspace's editable install."""
    import shutil

    for name in ("pipeline", "src"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    init = tmp_path / "src/detkd/__init__.py"
    init.write_text(init.read_text() + "\nprint('detkd from the copy')\n")
    entries = sorted(p for p in (tmp_path / "pipeline").glob("*.py") if p.name != "_src.py")
    assert len(entries) >= 8
    for entry in entries:
        proc = subprocess.run([sys.executable, str(entry), "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("detkd from the copy"), f"{entry.name} imported another detkd"


def test_the_readme_example_of_your_own_coco_data_prepares(tmp_path):
    """README's `data.coco` block, as written there, prepares a dataset laid out as it says."""
    from conftest import write_coco
    import numpy as np
    from PIL import Image

    text = (REPO / "README.md").read_text()
    block = text.split("# params.yaml: a COCO-format dataset of your own\n", 1)[1].split("```", 1)[0]
    example = yaml.safe_load(block)
    root = tmp_path / "widgets"
    example["data"]["root"] = str(root)
    coco = example["data"]["coco"]
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2, 3)]
    annotations = [{"id": i, "image_id": i, "category_id": 7, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0}
                   for i in (1, 2, 3)]
    for split in ("train", "val"):
        (root / coco[f"{split}_images"]).mkdir(parents=True)
        for image in images:
            Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / coco[f"{split}_images"] / image["file_name"])
        write_coco(root / coco[f"{split}_annotations"], images, annotations, [{"id": 7, "name": "widget"}])
    params = _params(tmp_path, example)
    proc = _stage("prepare.py", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "data/prepared/dataset.json").read_text())
    assert manifest["classes"] == ["widget"]
