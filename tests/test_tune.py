"""The tuning sweep of ``make compare``: equal budget, dev split only, chosen weights written into params."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from detkd.config import deep_merge, load_params, parse_params
from detkd.errors import ConfigError
from detkd.smoke import SMOKE_OVERRIDES
from detkd.tune import (SCALES, TunePoint, apply_choice, check_editable, choose, swept_hparams, term_sizes,
                        tune_plan)

from conftest import REPO


def test_every_method_gets_the_same_runs():
    points = tune_plan(["fasterrcnn", "retinanet"], ["fitnet", "dsig", "gid"])
    per_method = {}
    for p in points:
        per_method.setdefault((p.family, p.method), []).append(p.scale)
    assert per_method.pop(("fasterrcnn", "none")) == [1.0] and per_method.pop(("retinanet", "none")) == [1.0]
    assert all(scales == list(SCALES) for scales in per_method.values()) and len(per_method) == 6
    assert TunePoint("retinanet", "gid", 0.01).name == "tune-retina-gid-x0.01"


def test_swept_weights_scale_published_values_and_keep_settings():
    configured = {"alpha_obj": 0.08, "alpha_bg": 0.32, "beta_obj": 0.0, "beta_bg": 0.0, "level_base": 9.0}
    out = swept_hparams("defeat", "fasterrcnn", configured, 0.1)
    # published 4 / 16; the head terms configured off stay off; the size-dependent setting is kept
    assert out == {"alpha_obj": 0.4, "alpha_bg": 1.6, "beta_obj": 0.0, "beta_bg": 0.0, "level_base": 9.0}
    one_stage = swept_hparams("dsig", "retinanet", {}, 1.0)
    assert one_stage["w_edge"] == 1.0 and one_stage["w_logits"] == 1.0  # the family's published values
    assert swept_hparams("dsig", "fasterrcnn", {}, 0.1)["w_logits"] == 0.3  # no binary noise (0.30000000000000004)


def test_term_sizes_are_relative_to_the_detector_loss():
    history = [{"task/a": 1.0, "task/b": 1.0, "distill/x": 4.0}] * 5 + [{"task/a": 0.5, "task/b": 0.5, "distill/x": 0.1}] * 5
    assert term_sizes(history) == {"start": {"x": 2.0}, "end": {"x": pytest.approx(0.1)}}
    assert term_sizes([]) == {"start": {}, "end": {}}


def test_choose_takes_the_best_dev_ap_per_family_and_method():
    recs = [{"family": "fasterrcnn", "method": "gid", "scale": s, "dev_ap": ap} for s, ap in ((0.01, 0.3), (0.1, 0.3), (1.0, 0.2))]
    recs.append({"family": "retinanet", "method": "gid", "scale": 1.0, "dev_ap": 0.1})
    recs.append({"family": "fasterrcnn", "method": "none", "scale": 1.0, "dev_ap": 0.9})
    best = choose(recs)
    assert set(best) == {("fasterrcnn", "gid"), ("retinanet", "gid")}
    assert best[("fasterrcnn", "gid")]["scale"] == 0.01  # a tie goes to the gentler weights


def test_apply_choice_edits_one_line_and_keeps_comments(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text().splitlines()
    assert apply_choice(path, "retinanet", "gid", {"min_box_side": 2.0, "w_feature": 5e-05, "w_relation": 4.0})
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert changed[0][1].strip() == "gid: {min_box_side: 2.0, w_feature: 5.0e-05, w_relation: 4.0}"  # YAML 1.1 float
    p = load_params(path)
    assert p.distill.hparams("fasterrcnn") == load_params(REPO / "params.yaml").distill.hparams("fasterrcnn")
    assert p.distill.retinanet.gid == {"min_box_side": 2.0, "w_feature": 5e-05, "w_relation": 4.0}
    assert not apply_choice(path, "retinanet", "gid", {"min_box_side": 2.0, "w_feature": 5e-05, "w_relation": 4.0})
    # a trailing comment survives
    assert "# head KL off, as released" in path.read_text()
    apply_choice(path, "fasterrcnn", "defeat", {"alpha_obj": 0.4, "alpha_bg": 1.6, "beta_obj": 0.0, "beta_bg": 0.0,
                                                 "level_base": 9.0})
    assert "defeat: {alpha_obj: 0.4, alpha_bg: 1.6, beta_obj: 0.0, beta_bg: 0.0, level_base: 9.0}  # head KL off" in path.read_text()


def test_apply_choice_refuses_a_layout_it_cannot_edit(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  method: gid\n  fasterrcnn:\n    gid:\n      w_relation: 4.0\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: distill.fasterrcnn.gid must be a one-line"):
        apply_choice(path, "fasterrcnn", "gid", {"w_relation": 1.0})
    with pytest.raises(ConfigError, match=r"no 'mar' key"):
        apply_choice(path, "fasterrcnn", "mar", {"w_mask": 1.0})
    with pytest.raises(ConfigError, match=r"params.yaml:4: distill.fasterrcnn.gid must be a one-line"):
        check_editable(path, "fasterrcnn", "gid")  # what make compare checks before it starts tuning
    assert path.read_text().endswith("w_relation: 4.0\n")  # untouched


def test_a_tuning_run_trains_on_fit_and_scores_dev(tmp_path):
    """A real (tiny) run through the command line: the student is trained on the fit split only and its
    record holds the dev AP, the swept weights and the term sizes."""
    from detkd.data.prepare import prepare_dataset
    from detkd.engine.checkpoint import save_model_checkpoint
    from detkd.models.builder import build_detector, make_spec

    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE_OVERRIDES)
    params = parse_params(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    manifest = prepare_dataset(tmp_path / "prepared", params.data, params.seed)
    fit = json.loads((tmp_path / "prepared" / manifest["splits"]["fit"]["annotations"]).read_text())
    dev = json.loads((tmp_path / "prepared" / manifest["splits"]["dev"]["annotations"]).read_text())
    train = json.loads((tmp_path / "prepared" / manifest["splits"]["train"]["annotations"]).read_text())
    fit_ids, dev_ids = {i["id"] for i in fit["images"]}, {i["id"] for i in dev["images"]}
    assert not fit_ids & dev_ids and fit_ids | dev_ids == {i["id"] for i in train["images"]}
    spec = make_spec(params.model.family, params.teacher.backbone, params.data.synthetic.num_classes,
                     params.detector_config("teacher"))
    save_model_checkpoint(tmp_path / "t.pt", build_detector(spec), {"spec": spec.to_dict(), "category_ids": [1, 3, 5, 7],
                                                                   "category_names": manifest["classes"]})
    proc = subprocess.run([sys.executable, "-m", "detkd.tune", "--family", "fasterrcnn", "--method", "fitnet",
                           "--scale", "0.1", "--teacher", "t.pt", "--params", "params.yaml", "--data", "prepared",
                           "--work", "work", "--key", "k1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "work" / "tune-frcnn-fitnet-x0.1.json").read_text())
    assert record["hparams"] == {"weight": 0.1} and record["key"] == "k1" and 0.0 <= record["dev_ap"] <= 1.0
    assert set(record["terms"]["start"]) == {"fpn"}
    assert not (tmp_path / "work" / "tune-frcnn-fitnet-x0.1.pt").exists()
    iters = record["seconds"] / record["seconds_per_iter"]
    batch = params.train_student.batch_size
    per_epoch = -(-len(fit_ids) // batch)
    assert round(iters) == per_epoch * params.train_student.epochs  # fit's images, not train's


def test_dsig_sweeps_only_the_weights_its_family_reads():
    two = swept_hparams("dsig", "fasterrcnn", {}, 1.0)
    one = swept_hparams("dsig", "retinanet", {"w_fg": 0.5}, 1.0)  # a two-stage key left in params drops out
    assert "w_nodes" not in two and {"w_fg", "w_bg", "w_edge", "w_logits"} <= set(two)
    assert not {"w_fg", "w_bg"} & set(one) and {"w_nodes", "w_edge", "w_logits"} <= set(one)
    assert list(two)[:2] == ["w_fg", "w_bg"]  # the constructor's order
