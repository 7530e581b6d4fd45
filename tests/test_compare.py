"""``make compare``: experiment plan, DVC result parsing, report arithmetic, step-time breakdown."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from detkd.compare import Experiment, RunRecord, parse_exp_show, plan, prerequisite, record_from_metrics
from detkd.compare_report import build_report, check_targets, render_markdown, summarise, write_report
from detkd.config import deep_merge, parse_params
from detkd.errors import DetkdError
from detkd.smoke import SMOKE_OVERRIDES

from conftest import REPO


def test_plan_names_params_and_prerequisites():
    exps = plan(["fasterrcnn", "retinanet"], ["dsig", "gid"], seeds=2)
    assert [e.name for e in exps] == ["cmp-frcnn-teacher", "cmp-frcnn-dsig-s0", "cmp-frcnn-gid-s0", "cmp-frcnn-dsig-s1",
                                      "cmp-frcnn-gid-s1", "cmp-retina-teacher", "cmp-retina-dsig-s0", "cmp-retina-gid-s0",
                                      "cmp-retina-dsig-s1", "cmp-retina-gid-s1"]
    assert exps[0].set_params() == ["model.family=fasterrcnn"] and exps[0].target == "train_teacher"
    assert exps[2].set_params() == ["distill.method=gid", "train_student.seed=0", "model.family=fasterrcnn"]
    assert exps[2].target == "evaluate"  # nothing after evaluate (export, benchmark) is run per experiment
    pre = {e.name: (prerequisite(e, exps).name if prerequisite(e, exps) else None) for e in exps}
    assert pre["cmp-frcnn-teacher"] is None and pre["cmp-frcnn-dsig-s0"] == "cmp-frcnn-teacher"
    assert pre["cmp-frcnn-gid-s0"] == "cmp-frcnn-dsig-s0" and pre["cmp-frcnn-dsig-s1"] == "cmp-frcnn-teacher"
    assert pre["cmp-frcnn-gid-s1"] == "cmp-frcnn-dsig-s1" and pre["cmp-retina-dsig-s0"] == "cmp-retina-teacher"


def test_stale_experiment_is_recognised():
    """An experiment counts as done only if it ran with the params it would run with now."""
    from detkd.compare import is_current

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    exp = Experiment("fasterrcnn", "gid", 1)
    ran = deep_merge(raw, {"distill": {"method": "gid"}, "train_student": {"seed": 1}})
    assert is_current({"params": {"params.yaml": ran}}, raw, exp)
    retuned = deep_merge(raw, {"distill": {"fasterrcnn": {"gid": {"w_relation": 4.0}}}})
    assert not is_current({"params": {"params.yaml": ran}}, retuned, exp)
    other_family = deep_merge(raw, {"distill": {"retinanet": {"gid": {"w_relation": 4.0}}}})
    assert is_current({"params": {"params.yaml": ran}}, other_family, exp)  # another family's weights
    assert not is_current({"params": {}}, raw, exp)


def _metrics(teacher, student, distilled):
    return {"reports/eval.json": {"data": {"teacher": {"AP": teacher}, "student": {"AP": student},
                                           "distilled": {"AP": distilled}}},
            "reports/train/student.json": {"data": {"seconds_per_iter": 0.3, "peak_memory_mb": 900.0}},
            "reports/train/distill.json": {"data": {"seconds_per_iter": 0.45, "peak_memory_mb": 1400.0}}}


def test_parse_exp_show_keeps_finished_experiments_only():
    rows = [
        {"rev": "workspace", "name": None, "data": {}, "experiments": None},
        {"rev": "abc", "name": "main", "data": {}, "experiments": [
            {"name": "cmp-frcnn-dsig-s0", "executor": None,
             "revs": [{"rev": "r1", "name": "cmp-frcnn-dsig-s0", "error": None, "data": {"metrics": _metrics(0.5, 0.3, 0.4)}}]},
            {"name": "cmp-frcnn-gid-s0", "executor": {"state": "running"},
             "revs": [{"rev": "r2", "name": "cmp-frcnn-gid-s0", "data": {"metrics": {}}}]},
            {"name": "broken", "executor": None, "revs": [{"rev": "r3", "name": "broken", "error": {"msg": "x"}}]},
        ]},
    ]
    out = parse_exp_show(rows)
    assert list(out) == ["cmp-frcnn-dsig-s0"]
    rec = record_from_metrics(Experiment("fasterrcnn", "dsig", 0), out["cmp-frcnn-dsig-s0"])
    assert (rec.teacher_ap, rec.baseline_ap, rec.distilled_ap, rec.distill_s_per_iter) == (0.5, 0.3, 0.4, 0.45)
    with pytest.raises(DetkdError, match="cmp-frcnn-gid-s0.*lack"):
        record_from_metrics(Experiment("fasterrcnn", "gid", 0), {"metrics": {}})


def _rec(method, seed, base, dist, teacher=0.5, base_sit=0.3, dist_sit=0.45):
    return RunRecord("fasterrcnn", method, seed, teacher, base, dist, base_sit, dist_sit, 900.0, 1000.0 + seed)


def test_summary_pairs_gains_by_seed_and_computes_gap_share():
    records = [_rec("a", 0, 0.30, 0.40), _rec("a", 1, 0.34, 0.42), _rec("b", 0, 0.30, 0.29), _rec("b", 1, 0.34, 0.33)]
    s = summarise(records)
    assert s["baseline"]["ap_mean"] == pytest.approx(0.32)
    assert s["baseline"]["ap_std"] == pytest.approx(math.sqrt(2 * 0.02**2))  # sample std of 0.30, 0.34
    a = s["methods"]["a"]
    assert a["ap_mean"] == pytest.approx(0.41) and a["gain_mean"] == pytest.approx(0.09)
    assert a["gain_std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert a["gap_share"] == pytest.approx(0.09 / (0.5 - 0.32))
    assert a["time_per_iter_vs_baseline"] == pytest.approx(1.5)
    assert a["peak_memory_mb"] == 1001.0
    assert s["methods"]["b"]["gain_mean"] == pytest.approx(-0.01)
    s["methods"]["a"]["step"] = {"overhead_share_of_baseline": 0.05}
    s["methods"]["b"]["step"] = {"overhead_share_of_baseline": 0.20}
    t = check_targets(s)
    assert not t["every_method_raises_baseline"] and t["raises"] == {"a": True, "b": False}
    assert t["best_method"] == "a" and t["best_recovers_half_gap"]
    assert t["overhead_within_target"] == {"a": True, "b": False}


def test_paired_gain_confidence_interval():
    from detkd.compare_report import confidence_interval, t_critical

    lo, hi = confidence_interval([0.01, 0.03, 0.02])  # mean 0.02, sample std 0.01, t(2) = 4.303
    half = 4.303 * 0.01 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert confidence_interval([0.05]) is None
    assert t_critical(12) == 2.228 and t_critical(40) == 1.960  # between rows: the wider (smaller df) value


def _tune(method, scale, ap, family="fasterrcnn"):
    return {"family": family, "method": method, "scale": scale, "name": f"t-{method}-{scale}", "dev_ap": ap,
            "hparams": {} if method == "none" else {"weight": scale}, "seed": 0, "seconds": 10.0,
            "terms": {"start": {"fpn": 2.0}, "end": {"fpn": 0.5}}}


def test_report_files_and_markdown(tmp_path):
    records = [_rec("dsig", 0, 0.30, 0.40), _rec("gid", 0, 0.30, 0.35), _rec("dsig", 1, 0.32, 0.40),
               _rec("gid", 1, 0.32, 0.36)]
    step = {"family": "fasterrcnn", "method": "dsig", "baseline_step": 0.3, "teacher_forward": 0.05,
            "distill_step": 0.38, "overhead": 0.03, "overhead_share_of_baseline": 0.1, "iters": 5, "device": "cpu",
            "threads": 2}
    tuning = [_tune("none", 1.0, 0.2), *[_tune("dsig", s, ap) for s, ap in ((0.01, 0.25), (0.1, 0.3), (1.0, 0.28))]]
    report = build_report(records, [step], tuning)
    fam = report["families"]["fasterrcnn"]
    assert fam["methods"]["dsig"]["step"]["distill_step"] == 0.38
    assert fam["tuning"]["methods"]["dsig"]["chosen_scale"] == 0.1 and fam["tuning"]["baseline_dev_ap"] == 0.2
    md = render_markdown(report)
    assert "| dsig | 2 | 0.400 ± 0.000 | +0.090 [" in md
    assert "R18 33.06 -> 37.25" in md  # the published number sits beside ours
    assert "| dsig | 0.250 / 0.300 / 0.280 | 0.1x | weight 0.1 | fpn 2 -> 0.5 |" in md
    write_report(report, str(tmp_path / "kd"))
    assert json.loads((tmp_path / "kd.json").read_text())["families"]["fasterrcnn"]["targets"]["best_method"] == "dsig"
    assert (tmp_path / "kd.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_method_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "detkd.compare", "--methods", "dsig", "magic", "--no-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --methods: unknown ['magic']") and "dsig" in proc.stderr


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from detkd.data.prepare import prepare_dataset
    from detkd.engine.checkpoint import save_model_checkpoint
    from detkd.models.builder import build_detector, make_spec

    root = tmp_path_factory.mktemp("steptime")
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE_OVERRIDES)
    params = parse_params(raw)
    prepare_dataset(root / "prepared", params.data, params.seed)
    spec = make_spec(params.model.family, params.teacher.backbone, params.data.synthetic.num_classes,
                     params.detector_config("teacher"))
    manifest = json.loads((root / "prepared/dataset.json").read_text())
    save_model_checkpoint(root / "t.pt", build_detector(spec), {"spec": spec.to_dict(), "category_ids": [1, 3, 5, 7],
                                                               "category_names": manifest["classes"]})
    return params, root


@pytest.mark.parametrize("method", ["none", "dsig"])
def test_step_time_breakdown(tiny_setup, method):
    from detkd.step_time import measure_step_times

    params, root = tiny_setup
    out = measure_step_times(params, root / "prepared", root / "t.pt", method, iters=3, warmup=1)
    for key in ("baseline_step", "teacher_forward", "distill_step"):
        assert out[key] > 0
    # the median of per-batch differences, inside their interquartile range
    low, high = out["overhead_iqr"]
    assert low <= out["overhead"] <= high
    two = measure_step_times(params, root / "prepared", root / "t.pt", method, iters=2, warmup=0)
    # with two batches a median is a mean, so the paired difference equals the difference of the parts
    assert two["overhead"] == pytest.approx(two["distill_step"] - two["baseline_step"] - two["teacher_forward"]
                                            - two["teacher_on_request"])
    assert (out["teacher_on_request"] > 0) == (method == "dsig")  # DSIG runs the teacher's RoI head on its boxes
    assert out["overhead_share_of_baseline"] == pytest.approx(out["overhead"] / out["baseline_step"])
    assert (out["method"], out["iters"], out["family"]) == (method, 3, params.model.family)


def test_step_time_cli_prints_and_writes_each_method(tiny_setup, tmp_path, capsys):
    from detkd.step_time import main

    params, root = tiny_setup
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    out = tmp_path / "steps.json"
    main(["--teacher", str(root / "t.pt"), "--methods", "fitnet", "none", "--iters", "1", "--warmup", "0",
          "--params", str(params_file), "--data", str(root / "prepared"), "--pretrained", str(tmp_path / "none"),
          "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["family", "method"]
    assert [line.split()[1] for line in lines[1:]] == ["fitnet", "none"]
    assert [r["method"] for r in json.loads(out.read_text())] == ["fitnet", "none"]


def test_step_time_cli_refuses_an_unknown_teacher_or_method(tmp_path):
    from detkd.errors import DetkdError
    from detkd.step_time import main

    with pytest.raises(DetkdError, match="neither a file nor a DVC experiment name"):
        main(["--teacher", "no-such-experiment-xyz"])
    with pytest.raises(DetkdError, match="unknown"):
        main(["--methods", "dsgi"])
