"""What the MLflow runs carry: the pipeline run's params and headline numbers, each stage's machine, and the
registered student's signature, description, tags and the rule that moves ``@deployable``."""

from pathlib import Path

import pytest


@pytest.fixture
def store(tmp_path, monkeypatch):
    """store(pipeline_id) -> the URI of a fresh SQLite store that stages in ``tmp_path`` track to."""
    def open_store(pipeline: str) -> str:
        uri = f"sqlite:///{tmp_path / 'store.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("DETKD_PIPELINE_ID", pipeline)
        monkeypatch.delenv("DETKD_TRACKING", raising=False)
        monkeypatch.chdir(tmp_path)
        return uri
    return open_store


def test_the_pipeline_run_carries_params_and_headline_numbers_and_stages_their_machine(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from detkd.tracking.mlflow_run import stage_run

    uri = store("carries")
    (tmp_path / "params.yaml").write_text("seed: 3\ndistill: {method: gid, fasterrcnn: {gid: {w_feature: 0.5}}}\n")
    with stage_run("train_teacher", {"teacher": {"backbone": "resnet18"}}) as run:
        stage_id = run.run_id
    with stage_run("summary") as run:
        run.parent.log_metrics({"distilled_ap": 0.48, "speedup_b1": 4.4})
        parent_id = run.parent.run_id

    client = MlflowClient(uri)
    parent, stage = client.get_run(parent_id), client.get_run(stage_id)
    assert parent.data.tags["detkd.kind"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.params == {"seed": "3", "distill.method": "gid", "distill.fasterrcnn.gid.w_feature": "0.5"}
    assert parent.data.metrics == {"distilled_ap": 0.48, "speedup_b1": 4.4}
    assert stage.data.tags["mlflow.parentRunId"] == parent_id
    assert stage.data.tags["detkd.device"].startswith(("cpu: ", "cuda: "))
    assert stage.data.tags["detkd.version.torch"] and stage.data.tags["detkd.version.python"]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3 opens its training view


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["boxes"])], "tiny",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_deployable_moves_only_to_a_better_student_and_versions_carry_signature_and_tags(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from detkd.tracking.mlflow_run import stage_run

    uri = store("registry")
    model = _tiny_onnx(tmp_path / "m.onnx")
    outcomes = []
    for ap in (0.40, 0.35, 0.45):
        with stage_run("export") as run:
            outcomes.append(run.log_onnx_model(model, "distilled-onnx", "detkd-student", "deployable", score=ap,
                                               tags={"AP": f"{ap:.4f}", "method": "gid", "pipeline_id": f"p{ap}"},
                                               description=f"AP {ap}"))
    assert [o["alias_moved"] for o in outcomes] == [True, False, True]
    assert "does not beat version 1's 0.4000" in outcomes[1]["reason"]
    client = MlflowClient(uri)
    holder = client.get_model_version_by_alias("detkd-student", "deployable")
    assert str(holder.version) == outcomes[2]["version"]
    assert holder.tags == {"AP": "0.4500", "method": "gid", "pipeline_id": "p0.45"}
    with stage_run("summary") as run:  # a later stage of that pipeline adds its latency to the version it registered
        assert run.tag_model_versions("detkd-student", "p0.45", {"p50_ms": 6.45}) == 1
    assert client.get_model_version("detkd-student", holder.version).tags["p50_ms"] == "6.45"
    assert holder.description == "AP 0.45"

    import mlflow

    info = mlflow.models.get_model_info(f"models:/detkd-student/{holder.version}")
    (spec,) = info.signature.inputs.inputs
    assert (spec.name, str(spec.type), tuple(spec.shape)) == ("images", "float32", (-1, 3, 8, 8))
    assert info.signature.outputs.input_names() == ["boxes"]
