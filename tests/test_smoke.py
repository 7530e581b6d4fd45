"""The smoke pipeline: the real dvc.yaml end to end on a tiny override (also `make smoke`)."""

import pytest

from detkd.smoke import run_smoke

from conftest import REPO


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_tracks_and_is_cached(tmp_path):
    summary = run_smoke(REPO, tmp_path)
    assert set(summary["eval"]) == {"teacher", "student", "distilled"}
    for metrics in summary["eval"].values():
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(metrics)
        assert 0.0 <= metrics["AP"] <= 1.0 and len(metrics["per_class"]) == 4  # tiny override: 4 classes
    for path in ("models/teacher.pt", "models/student.pt", "models/student_distilled.pt", "reports/train/distill.csv",
                 "reports/train/teacher.csv", "reports/pr/student.json",
                 "reports/pr_curves.png", "reports/data_preview.png", "reports/eval.md", "dvc.lock",
                 "models/export/teacher.onnx", "models/export/distilled.onnx", "reports/export.json",
                 "reports/benchmark.json", "reports/benchmark.md", "reports/benchmark.png", "reports/summary.md",
                 "models/export/student.onnx", "reports/summary.json", "reports/frontier.json", "reports/frontier.md",
                 "reports/frontier.png"):
        assert (tmp_path / path).is_file(), path
    # a second `dvc repro` has nothing to do
    assert "up to date" in summary["status"]
    assert "Running stage" not in summary["second_log"]

    # MLflow: one parent run for the pipeline, one linked run per stage, each with params and metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name("detkd")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`detkd.pipeline_id` = 'smoke'")
    parents = [r for r in runs if r.data.tags.get("detkd.kind") == "pipeline"]
    stages = {r.data.tags["detkd.stage"]: r for r in runs if r.data.tags.get("detkd.kind") == "stage"}
    assert len(parents) == 1 and set(stages) == set(summary["stages"])
    # the pipeline's run compares pipelines: its params and headline numbers; each stage records its machine
    assert parents[0].data.params["distill.method"] == "dsig" and "distilled_ap" in parents[0].data.metrics
    assert all(r.data.tags["detkd.device"] and r.data.tags["detkd.version.torch"] for r in stages.values())
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in stages.values())
    assert all(r.data.tags["detkd.git_commit"] != "unknown" for r in stages.values())
    teacher = stages["train_teacher"]
    assert teacher.data.params["teacher.backbone"] == "resnet18" and "loss" in teacher.data.metrics
    assert len(client.get_metric_history(teacher.info.run_id, "loss")) >= 2  # per-step metrics
    assert "teacher.AP" in stages["evaluate"].data.metrics and "distilled.AP" in stages["evaluate"].data.metrics
    distill = stages["distill"]  # the method, its hyper-parameters and every loss term are recorded
    assert distill.data.params["distill.method"] == "dsig" and "distill.dsig.w_edge" in distill.data.params  # every value it ran with
    assert {"distill.nodes_fg", "distill.nodes_bg", "distill.edges", "task.loss_classifier"} <= set(distill.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(teacher.info.run_id)}
    assert "teacher.pt" in artifacts

    # deployment: gates passed, TensorRT absence recorded, benchmark rows carry latency and the artefact's AP
    import json

    export = json.loads((tmp_path / "reports/export.json").read_text())
    assert set(export["models"]) == {"teacher", "student", "distilled"}
    assert "available" in export["tensorrt"]
    bench = json.loads((tmp_path / "reports/benchmark.json").read_text())
    runtimes = {"onnxruntime-cpu", "openvino-cpu"}
    for name, m in export["models"].items():
        assert m["graph"]["tensorrt_static_check"]["passed"]
        assert set(m["artefacts"]) == {"fp32", "fp16", "int8"}
        fp32 = m["artefacts"]["fp32"]
        assert set(fp32["gates"]) == runtimes and all(g["passed"] for g in fp32["gates"].values())
        for precision in ("fp16", "int8"):  # FP16 and INT8 gates on the smoke data, on both CPU runtimes
            a = m["artefacts"][precision]
            assert set(a["gates"]) == runtimes and a["made"]["tensorrt_static_check"]["passed"]
            limit = {"fp16": 0.005, "int8": 0.01}[precision]
            for backend, g in a["gates"].items():
                assert g["ap_gate"]["max_difference"] == limit and not g["raw_outputs"]["gated"]
                assert g["passed"] == (abs(g["metrics"]["AP"] - g["ap_gate"]["reference_ap"]) <= limit + 1e-12)
                if backend == "openvino-cpu":
                    assert g["inference_precision"] == "f32"
            assert a["status"] == ("deployable" if a["deployable_on"] else "rejected")
            # a rejected file is out of the deployment set; a deployable one is there, and is timed with its AP
            assert (tmp_path / a["path"]).is_file() and ("/rejected/" in a["path"]) == (a["status"] == "rejected")
            for backend in runtimes:
                row = bench["results"][name].get(f"{backend}/{precision}", {}).get("batch1")
                assert (row is not None) == (backend in a["deployable_on"])
                if row:
                    assert row["precision"] == precision and row["AP"] == a["gates"][backend]["metrics"]["AP"]
    row = bench["results"]["distilled"]["onnxruntime-cpu"]["batch2"]
    fp32_gates = export["models"]["distilled"]["artefacts"]["fp32"]["gates"]
    assert row["p50_ms"] > 0 and row["AP"] == fp32_gates["onnxruntime-cpu"]["metrics"]["AP"]
    assert bench["results"]["distilled"]["openvino-cpu"]["batch1"]["AP"] == fp32_gates["openvino-cpu"]["metrics"]["AP"]
    assert "distilled student" in (tmp_path / "reports/summary.md").read_text()
    # headline numbers: flat and numeric; the frontier has a point per measured artefact, arrows baseline -> distilled
    headline = json.loads((tmp_path / "reports/summary.json").read_text())
    assert {"teacher_ap", "baseline_ap", "distilled_ap", "ap_ratio", "distill_gain", "speedup_b1", "teacher_p50_ms",
            "distilled_p50_ms", "deployed_p50_ms", "deployed_ap", "compression_b1"} <= set(headline)
    assert headline["compression_b1"] == pytest.approx(headline["teacher_p50_ms"] / headline["deployed_p50_ms"], rel=1e-2)
    assert headline["deployed_p50_ms"] <= headline["distilled_p50_ms"]  # the fastest gated artefact, FP32 included
    assert all(isinstance(v, (int, float)) for v in headline.values())
    assert headline["speedup_b1"] == pytest.approx(headline["teacher_p50_ms"] / headline["distilled_p50_ms"], rel=1e-2)
    frontier = json.loads((tmp_path / "reports/frontier.json").read_text())
    measured = {(m, b.split("/")[0], r["batch1"]["precision"]) for m, backends in bench["results"].items()
                for b, r in backends.items() if "batch1" in r}
    assert {(p["model"], p["backend"], p["precision"]) for p in frontier["points"]} == measured
    assert {(a["backend"], a["precision"]) for a in frontier["arrows"]} == {(b, q) for m, b, q in measured if m == "student"}
    # the student is built from its own section (narrower than the teacher), and export rebuilt it from the checkpoint
    import torch

    meta = torch.load(tmp_path / "models/student_distilled.pt", weights_only=True)["meta"]
    assert meta["spec"]["backbone"] == "mobilenet_v3_small" and meta["spec"]["model"]["fpn_channels"] == 16
    assert export["models"]["distilled"]["backbone"] == "mobilenet_v3_small"
    version = client.get_model_version_by_alias("detkd-student", "deployable")
    assert version.run_id == stages["export"].info.run_id

    # `dvc plots show`: every declared plot renders, with data from each model's file
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=tmp_path, capture_output=True,
                           text=True)
    plots = json.loads(shown.stdout)
    assert not plots.get("errors"), plots.get("errors")
    task = next(v for k, v in plots["data"].items() if k.startswith("task loss"))
    files = {row["filename"].split("/")[-1] for row in task[0]["content"]["data"]["values"]}
    assert files == {"teacher.csv", "student.csv", "distill.csv"}
