"""The export stage publishes its files and its report as one set: killed with SIGKILL while it writes the
new set, it leaves the previous set and report exactly as they were; run again, it publishes the new set
whole, with a report whose paths name the published files."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, stage_env

from detkd.config import parse_params
from detkd.engine.checkpoint import save_model_checkpoint
from detkd.evaluation.report import evaluate_checkpoint, write_reports
from detkd.data.dataset import open_split
from detkd.models.builder import build_detector, make_spec

pytestmark = pytest.mark.fault

MODELS = ("teacher", "distilled")


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_models(root: Path, params, seed: int) -> None:
    """Two untrained detectors (different seeds give different files) and their PyTorch AP in eval.json."""
    manifest = json.loads((root / "prepared/dataset.json").read_text())
    spec = make_spec(params.model.family, params.student.backbone, len(manifest["classes"]),
                     params.detector_config("student"))
    index = open_split(root / "prepared", "val", params.data.min_box_size)
    evaluated = {}
    for offset, name in enumerate(MODELS):
        torch.manual_seed(seed + offset)
        save_model_checkpoint(root / f"{name}.pt", build_detector(spec),
                              {"spec": spec.to_dict(), "category_ids": index.category_ids,
                               "category_names": manifest["classes"]})
        evaluated[name] = evaluate_checkpoint(root / f"{name}.pt", index, params.eval.batch_size, torch.device("cpu"))
    write_reports(evaluated, root / "eval.json", root / "pr")


def _export_command(root: Path) -> list[str]:
    return [sys.executable, str(REPO / "pipeline/export.py"), "--params", str(root / "export-params.yaml"),
            "--data", str(root / "prepared"), *[a for n in MODELS for a in ("--model", f"{n}={root / n}.pt")],
            "--eval", str(root / "eval.json"), "--out-dir", str(root / "export"), "--report", str(root / "export.json")]


def _export(root: Path) -> None:
    proc = subprocess.run(_export_command(root), env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_killed_export_leaves_the_previous_set_and_report_whole(tiny_stage):
    root = tiny_stage
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["export"] = {**raw["export"], "precisions": ["fp32"],
                     "gate": {**raw["export"]["gate"], "runtimes": ["onnxruntime"], "sample_images": 2}}
    (root / "export-params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    out, report = root / "export", root / "export.json"

    _write_models(root, params, seed=1)
    _export(root)
    before, before_report = _digests(out), report.read_bytes()
    old_mtime = (out / "teacher.onnx").stat().st_mtime_ns
    assert set(before) == {"teacher.onnx", "distilled.onnx"}

    _write_models(root, params, seed=2)  # new weights: every new file differs from the old one
    proc = subprocess.Popen(_export_command(root), env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        written = [p for p in [out / "teacher.onnx", *root.glob(".export.*/teacher.onnx")] if p.exists()]
        if any(p.stat().st_mtime_ns != old_mtime for p in written):  # one new file is written (wherever)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"export ended before its first new file was seen (rc {proc.returncode})"
    assert _digests(out) == before, "a killed export changed the published set"
    assert report.read_bytes() == before_report

    _export(root)
    after = _digests(out)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)
    assert not list(root.glob(".export.*")), "the killed run's staging directory was not cleaned up"
    text = report.read_text()
    assert ".partial" not in text
    published = json.loads(text)["models"]
    assert {n: Path(e["artefacts"]["fp32"]["path"]) for n, e in published.items()} == \
        {n: out / f"{n}.onnx" for n in MODELS}
