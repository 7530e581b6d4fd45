"""``make frontier``: sizes become DVC ``-S`` overrides that params accept, and experiment results become records."""

import pytest
import yaml

from detkd.config import deep_merge, load_params, parse_params
from detkd.errors import DetkdError
from detkd.frontier_sizes import SizeExperiment, flatten_sets, size_record

from conftest import REPO


def _unflatten(sets: list[str]) -> dict:
    """What ``dvc exp run -S key.path=value`` does to params.yaml (the value parsed as YAML)."""
    out: dict = {}
    for item in sets:
        path, value = item.split("=", 1)
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def test_flatten_sets_nested_overrides():
    sets = flatten_sets("student", {"backbone": "mobilenet_v3_small", "fpn_norm": True, "fpn_channels": 32,
                                    "fasterrcnn": {"representation_size": 64}})
    assert sets == ["student.backbone=mobilenet_v3_small", "student.fpn_norm=true", "student.fpn_channels=32",
                    "student.fasterrcnn.representation_size=64"]


def test_every_repository_size_applies_as_dvc_overrides():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert params.frontier.sizes, "params.yaml declares the sizes of `make frontier`"
    for name, override in params.frontier.sizes.items():
        exp = SizeExperiment(name, tuple(flatten_sets("student", override)))
        assert exp.name == f"frontier-{name}"
        applied = parse_params(deep_merge(raw, _unflatten(exp.set_params())))
        assert applied.student == params.student_size(name)
        assert applied.teacher == params.teacher  # the teacher is shared: DVC restores it from the run cache


def test_size_record_needs_the_headline_numbers():
    metrics = {"teacher_ap": 0.5, "baseline_ap": 0.3, "distilled_ap": 0.4, "baseline_p50_ms": 5.0,
               "distilled_p50_ms": 5.1, "teacher_p50_ms": 30.0, "speedup_b1": 5.9}
    record = size_record("small", metrics, "AMD EPYC", "label")
    assert record == {"name": "small", "label": "label", "cpu": "AMD EPYC", "teacher_ap": 0.5, "baseline_ap": 0.3,
                      "distilled_ap": 0.4, "baseline_p50_ms": 5.0, "distilled_p50_ms": 5.1, "teacher_p50_ms": 30.0}
    with pytest.raises(DetkdError, match=r"frontier-small: reports/summary.json lacks \['distilled_p50_ms'\]"):
        size_record("small", {k: v for k, v in metrics.items() if k != "distilled_p50_ms"}, "cpu", "label")


def test_frontier_markdown_with_a_teacher_at_ap_zero():
    """A few smoke-test iterations can leave the teacher at AP 0: the ratio column says n/a, no crash."""
    from detkd.frontier import markdown

    size = {"name": "default", "this_run": True, "baseline_p50_ms": 5.0, "distilled_p50_ms": 5.0,
            "baseline_ap": 0.0, "distilled_ap": 0.01}
    report = {"machine": "test", "batch": "batch1", "points": [], "arrows": [], "sizes": [size], "cpu": "x",
              "teacher": {"AP": 0.0, "p50_ms": 20.0}}
    assert "| +0.010 | n/a |" in markdown(report)
