"""Torch-free runtime, accuracy gate, benchmark arithmetic, summary, deploy CLI and Triton config."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.bench.latency import latency_stats, time_callable
from detkd.bench.report import markdown
from detkd.bench.run import check_targets
from detkd.errors import InferenceInputError, ModelFileError
from detkd.export.gate import Tolerance, ap_gate, match_detections
from detkd.export.onnx_export import export_onnx
from detkd.runtime import load_runner
from detkd.runtime.metadata import ModelInfo
from detkd.runtime.preprocess import letterbox, read_image, to_image_coordinates
from detkd.runtime.triton import write_model_repository
from detkd.runtime.trt_runner import check_engine_compatibility
from detkd.summary import build_summary

from conftest import REPO
from test_export import tiny_detector, tiny_info


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    model = tiny_detector("fasterrcnn")
    path = tmp_path_factory.mktemp("rt") / "tiny.onnx"
    export_onnx(model, tiny_info(model), path)
    return model, path


def test_letterbox_matches_torchvision_transform():
    """Same resize and padding as GeneralizedRCNNTransform on a non-square image (normalised values)."""
    model = tiny_detector("fasterrcnn")
    info = tiny_info(model)
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    boxed, resized = letterbox(image, info)
    assert boxed.shape == (3, 64, 64) and resized == (35, 64)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    ref = model.transform([tensor])[0].tensors[0]  # normalised, padded to a multiple of 32
    mean, std = np.array(info.image_mean)[:, None, None], np.array(info.image_std)[:, None, None]
    ours = (boxed - mean) / std
    np.testing.assert_allclose(ours[:, :ref.shape[1], :ref.shape[2]], ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours[:, ref.shape[1]:, :], 0.0, atol=1e-6)  # padding normalises to zero


def test_boxes_map_back_with_per_axis_ratios_and_are_clipped():
    boxes = np.array([[10.0, 5.0, 64.0, 35.0], [0, 0, 70, 40]], dtype=np.float32)
    out = to_image_coordinates(boxes, (35, 64), (50, 90))
    np.testing.assert_allclose(out[0], [10 * 90 / 64, 5 * 50 / 35, 90, 50], rtol=1e-6)
    assert out[1, 2] == 90 and out[1, 3] == 50


def test_detect_returns_image_coordinates_and_class_names(onnx_model):
    _, path = onnx_model
    runner = load_runner(path)
    image = np.random.default_rng(1).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    (det,) = runner.detect([image])
    assert len(det["boxes"]) == len(det["scores"]) == len(det["class_names"]) > 0
    assert (det["boxes"][:, 2] <= 90).all() and (det["boxes"][:, 3] <= 50).all()
    assert set(det["class_names"]) <= {"a", "b", "c"}


@pytest.mark.fault
def test_corrupt_truncated_and_foreign_onnx_files_are_clear_errors(onnx_model, tmp_path):
    _, path = onnx_model
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: 5000])
    with pytest.raises(ModelFileError, match="truncated.onnx: not a loadable ONNX model"):
        load_runner(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(ModelFileError, match="garbage.onnx"):
        load_runner(garbage)
    import onnx
    from onnx import helper, TensorProto

    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["images"], ["y"])], "g",
                                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFileError, match="metadata key 'detkd.class_names' missing"):
        load_runner(tmp_path / "plain.onnx")
    with pytest.raises(ModelFileError, match="model file not found"):
        load_runner(tmp_path / "nope.onnx")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown model type"):
        load_runner(tmp_path / "model.pt")


@pytest.mark.parametrize("batch", [np.zeros((1, 3, 32, 32), np.float32), np.zeros((1, 3, 64, 64), np.float64),
                                   np.zeros((3, 64, 64), np.float32), np.zeros((0, 3, 64, 64), np.float32)])
def test_wrong_input_shape_or_dtype_names_the_contract(onnx_model, batch):
    runner = load_runner(onnx_model[1])
    with pytest.raises(InferenceInputError, match=r"must be a float32 array \[N, 3, 64, 64\]"):
        runner.infer(batch)


@pytest.mark.fault
def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InferenceInputError, match="bad.jpg: not a readable image"):
        read_image(bad)
    with pytest.raises(InferenceInputError, match="image not found"):
        read_image(tmp_path / "missing.png")


@pytest.mark.fault
def test_images_are_read_as_displayed(tmp_path):
    """16-bit greyscale keeps its range, transparency is composited over white, EXIF orientation applies."""
    grey16 = (np.arange(8 * 8).reshape(8, 8) * 1000).astype(np.uint16)  # up to 63,000 of 65,535
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == round(63000 * 255 / 65535) and len(np.unique(rgb)) > 32

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = read_image(tmp_path / "alpha.png")
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]

    upright = np.zeros((20, 40, 3), np.uint8)  # 20 high, 40 wide; EXIF 6 = shown rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)


@pytest.mark.fault
@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "1", "RGB"])
def test_every_common_pixel_format_reads_as_the_rgb_pillow_shows(tmp_path, mode):
    """Greyscale, palette, CMYK, grey + alpha and bilevel images become the RGB a viewer shows (alpha
    over white); one test per mode."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    base = PILImage.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))
    image = base.convert(mode)
    suffix = "tiff" if mode == "CMYK" else "png"
    image.save(tmp_path / f"img.{suffix}")
    got = read_image(tmp_path / f"img.{suffix}")
    assert got.shape == (6, 5, 3) and got.dtype == np.uint8
    reference = PILImage.open(tmp_path / f"img.{suffix}")
    if mode == "LA":
        flat = PILImage.alpha_composite(PILImage.new("RGBA", reference.size, "white"), reference.convert("RGBA"))
        expected = np.asarray(flat.convert("RGB"))
    else:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(got, expected)


@pytest.mark.fault
def test_images_that_cannot_be_used_are_refused_in_one_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from types import SimpleNamespace

    from detkd.runtime.preprocess import check_detectable

    PILImage.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "float.tiff")
    with pytest.raises(InferenceInputError, match="float.tiff: floating-point pixels .* no known range"):
        read_image(tmp_path / "float.tiff")
    PILImage.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels > 2x the limit: Pillow's bomb error
    with pytest.raises(InferenceInputError, match="big.png: .*decompression bomb"):
        read_image(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 3000)  # above the limit, below twice it: Pillow only warns
    with pytest.raises(InferenceInputError, match=r"big.png: 64x64 = 4096 pixels is above the limit of 3000"):
        read_image(tmp_path / "big.png")
    with pytest.raises(InferenceInputError, match="image 2x2000 is too thin"):
        check_detectable((2, 2000, 3), SimpleNamespace(min_size=64, max_size=64))


def test_engine_for_another_gpu_or_tensorrt_is_refused_before_loading():
    built = {"tensorrt_version": "10.0.1", "device_name": "NVIDIA A100", "compute_capability": "8.0"}
    check_engine_compatibility(built, dict(built), "x.engine")  # same machine: fine
    with pytest.raises(ModelFileError, match=r"tensorrt version '10.0.1' \(this machine: '10.3.0'\).*rebuild"):
        check_engine_compatibility(built, {**built, "tensorrt_version": "10.3.0"}, "x.engine")
    with pytest.raises(ModelFileError, match="device name 'NVIDIA A100'.*compute capability"):
        check_engine_compatibility(built, {**built, "device_name": "NVIDIA H100", "compute_capability": "9.0"}, "x.engine")


def test_engine_without_its_description_is_refused(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\x00" * 10)
    with pytest.raises(ModelFileError, match="m.engine.json is missing"):
        load_runner(engine)


def test_match_detections_and_ap_gate_known_answers():
    ref = {"boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2.]]), "scores": np.array([0.9, 0.5, 0.4]),
           "labels": np.array([1, 2, 0])}
    cand = {"boxes": np.array([[5, 5, 20.01, 20], [0, 0, 10, 10.]]), "scores": np.array([0.5, 0.9]),
            "labels": np.array([2, 1])}
    result = match_detections(ref, cand, Tolerance(box_atol=0.05, score_atol=1e-3))
    assert result["matched"] == 2 and result["unmatched"] == 0  # label 0 (background) is not compared
    assert result["max_box_diff"] == pytest.approx(0.01)
    result = match_detections(ref, cand, Tolerance(box_atol=0.001))
    assert result["matched"] == 1 and result["unmatched"] == 1
    cand["labels"] = np.array([3, 1])
    assert match_detections(ref, cand, Tolerance())["unmatched"] == 1
    # a detection missing from the artefact's output at its cut-off (rounding swapped it with a near-equal one)
    # is tied; one missing well above the cut-off is unmatched
    cand["labels"] = np.array([2, 1])
    ref["scores"] = np.array([0.9, 0.0502, 0.4])
    result = match_detections(ref, {k: v[1:] for k, v in cand.items()}, Tolerance(score_atol=1e-3), cutoff=0.05)
    assert (result["matched"], result["unmatched"], result["tied"]) == (1, 0, 1)
    result = match_detections(ref, {k: v[1:] for k, v in cand.items()}, Tolerance(score_atol=1e-3), cutoff=0.04)
    assert (result["matched"], result["unmatched"], result["tied"]) == (1, 1, 0)
    assert match_detections(ref, {k: v[1:] for k, v in cand.items()}, Tolerance())["unmatched"] == 1  # no cut-off given
    # equal scores: NMS kept another of the tied boxes. Excused only when the reference itself holds the tie
    # and the artefact holds a spare detection of that label and score; a wrong box of distinct score is not
    tie_ref = {"boxes": np.array([[0, 0, 10, 10], [8, 0, 18, 10], [30, 30, 40, 40.]]),
               "scores": np.array([0.2371, 0.2366, 0.8]), "labels": np.array([3, 3, 3])}
    tie_cand = {"boxes": np.array([[0, 0, 10, 10], [4, 0, 14, 10], [30, 30, 40, 40.]]),
                "scores": np.array([0.2371, 0.2369, 0.8]), "labels": np.array([3, 3, 3])}
    result = match_detections(tie_ref, tie_cand, Tolerance(score_atol=1e-3))
    assert (result["matched"], result["unmatched"], result["tied"]) == (2, 0, 1)
    tie_ref["scores"] = np.array([0.2371, 0.15, 0.8])  # no tie in the reference: the wrong box counts
    tie_cand["scores"] = np.array([0.2371, 0.1503, 0.8])
    result = match_detections(tie_ref, tie_cand, Tolerance(score_atol=1e-3))
    assert (result["matched"], result["unmatched"], result["tied"]) == (2, 1, 0)
    assert ap_gate(0.5, 0.504, 0.005)["passed"] and not ap_gate(0.5, 0.494, 0.005)["passed"]
    assert ap_gate(0.5, 0.494, 0.005)["difference"] == pytest.approx(-0.006)


def test_latency_statistics_known_answers():
    stats = latency_stats([0.010, 0.020, 0.030, 0.040], batch=2)
    assert stats["p50_ms"] == pytest.approx(25.0) and stats["mean_ms"] == pytest.approx(25.0)
    assert stats["p90_ms"] == pytest.approx(37.0) and stats["throughput_ips"] == pytest.approx(80.0)
    calls = []
    seconds = time_callable(lambda: calls.append(1), warmup=3, iterations=5, synchronize=lambda: calls.append(0))
    assert len(seconds) == 5 and calls.count(1) == 8  # warm-up calls are not timed


def _row(p50, ap=0.5, precision="fp32"):
    return {"p50_ms": p50, "p90_ms": p50, "p99_ms": p50, "mean_ms": p50, "throughput_ips": 1000 / p50, "size_mb": 1.0,
            "AP": ap, "precision": precision, "artefact": "x"}


def _env():
    return {"cpu": "cpu", "cpu_count": 2, "torch_threads": 2, "onnxruntime_threads": 2, "gpu": None,
            "versions": {"torch": "t", "onnxruntime": "o", "tensorrt": None}}


def _gate(ap):
    return {"metrics": {"AP": ap}, "ap_gate": ap_gate(ap, ap, 0.005), "passed": True}


def _export(models):
    return {"tensorrt": {"available": False, "reason": "absent"},
            "models": {n: {"backbone": b, "input_size": 64, "graph": {"size_mb": 2.0}, "engines": {},
                           "artefacts": {"fp32": {"path": f"{n}.onnx", "precision": "fp32", "status": "deployable",
                                                  "deployable_on": ["onnxruntime-cpu"],
                                                  "gates": {"onnxruntime-cpu": _gate(ap)}}}}
                       for n, b, ap in models}}


def test_targets_use_the_fastest_cpu_backend_per_model():
    results = {"teacher": {"torch-cpu": {"batch1": _row(100)}, "onnxruntime-cpu": {"batch1": _row(80)}},
               "distilled": {"torch-cpu": {"batch1": _row(30)}, "onnxruntime-cpu": {"batch1": _row(45)}}}
    targets = check_targets(results)
    s = targets["speedup"]["batch1"]
    assert s["teacher_backend"] == "onnxruntime-cpu" and s["student_backend"] == "torch-cpu"
    assert s["speedup"] == pytest.approx(80 / 30) and not s["met"]  # target 3x
    assert targets["onnxruntime_vs_torch_cpu"]["teacher"]["batch1"]["met"]
    assert not targets["onnxruntime_vs_torch_cpu"]["distilled"]["batch1"]["met"]
    report = {"environment": _env(), "results": results, "skipped": {"tensorrt": "absent"}, "targets": targets}
    text = markdown(report)
    assert "| distilled | torch-cpu | FP32 | – | 1 | 30.0 |" in text and "2.67x faster" in text and "tensorrt: absent" in text
    results["student"] = {"torch-cpu": {"batch1": _row(31)}, "onnxruntime-cpu": {"batch1": _row(44)}}
    export = _export((("teacher", "resnet34", 0.5), ("student", "mobilenet_v3_large", 0.3),
                      ("distilled", "mobilenet_v3_large", 0.4)))
    summary = build_summary({"teacher": {"AP": 0.5}, "student": {"AP": 0.3}, "distilled": {"AP": 0.4}}, export, report)
    assert "| baseline student | mobilenet_v3_large | 0.300 | 0.300 | 31.0 | 44.0 | 2.0 |" in summary
    assert "| distilled student | mobilenet_v3_large | 0.400 | 0.400 | 30.0 | 45.0 | 2.0 |" in summary
    assert "2.67x (torch-cpu 30.0 ms vs onnxruntime-cpu 80.0 ms)" in summary
    assert "Target distilled AP >= 0.85 of the teacher's: 0.80, not met" in summary


def test_headline_numbers_are_flat_and_use_the_fastest_fp32_cpu_row():
    from detkd.summary import headline

    results = {"teacher": {"torch-cpu": {"batch1": _row(100)}, "onnxruntime-cpu": {"batch1": _row(60)},
                           "onnxruntime-cuda": {"batch1": _row(5)}},  # a GPU row is no CPU row
               "student": {"onnxruntime-cpu": {"batch1": _row(20)}},
               "distilled": {"onnxruntime-cpu": {"batch1": _row(20)},
                             "openvino-cpu": {"batch1": _row(8, precision="int8")}}}  # INT8 is not FP32
    export = _export((("teacher", "resnet34", 0.5), ("distilled", "mobilenet_v3_large", 0.45)))
    numbers = headline({"teacher": {"AP": 0.5}, "student": {"AP": 0.36}, "distilled": {"AP": 0.45}}, export,
                       {"results": results})
    assert numbers == {"teacher_ap": 0.5, "baseline_ap": 0.36, "distilled_ap": 0.45, "ap_ratio": 0.9,
                       "distill_gain": 0.09, "teacher_p50_ms": 60.0, "baseline_p50_ms": 20.0, "distilled_p50_ms": 20.0,
                       "speedup_b1": 3.0, "deployed_ap": 0.5, "deployed_p50_ms": 8.0, "compression_b1": 7.5,
                       "teacher_onnx_mb": 2.0, "distilled_onnx_mb": 2.0, "gates_passed": 1, "artefacts_deployable": 2,
                       "artefacts_rejected": 0}
    export["models"]["distilled"]["artefacts"]["fp32"]["status"] = "rejected"
    assert headline({"teacher": {"AP": 0.5}, "student": {"AP": 0.36}, "distilled": {"AP": 0.45}}, export,
                    {"results": results})["gates_passed"] == 0


def test_frontier_has_a_point_per_artefact_arrows_and_sizes(tmp_path):
    from detkd.frontier import build_frontier, write

    results = {"teacher": {"onnxruntime-cpu": {"batch1": _row(30, 0.5)}, "torch-cpu": {"batch1": _row(60, 0.5)}},
               "student": {"onnxruntime-cpu": {"batch1": _row(6, 0.35)}, "torch-cpu": {"batch1": _row(15, 0.35)}},
               "distilled": {"onnxruntime-cpu": {"batch1": _row(6.1, 0.45), "batch8": _row(40, 0.45)},
                             "torch-cpu": {"batch1": _row(15, 0.45)},
                             "openvino-cpu": {"batch1": _row(3, 0.44, "int8")}}}
    summary = {"teacher_ap": 0.5, "baseline_ap": 0.35, "distilled_ap": 0.45, "teacher_p50_ms": 30.0,
               "baseline_p50_ms": 6.0, "distilled_p50_ms": 6.1}
    sizes = {"sizes": [{"name": "small", "baseline_ap": 0.2, "distilled_ap": 0.3, "baseline_p50_ms": 3.0,
                        "distilled_p50_ms": 3.1, "cpu": "cpu"},
                       {"name": "large", "baseline_ap": 0.4, "distilled_ap": 0.47, "baseline_p50_ms": 12.0,
                        "distilled_p50_ms": 12.2, "cpu": "other cpu"}]}
    report = build_frontier({"environment": _env(), "results": results}, summary, sizes)
    assert len(report["points"]) == 7  # every batch-1 row, whatever its backend or precision; no batch-8 row
    assert {(p["model"], p["backend"], p["precision"]) for p in report["points"]} >= {("distilled", "openvino-cpu", "int8")}
    assert sorted((a["backend"], round(a["ap_gain"], 3)) for a in report["arrows"]) == [("onnxruntime-cpu", 0.1),
                                                                                         ("torch-cpu", 0.1)]
    assert [s["name"] for s in report["sizes"]] == ["small", "default", "large"]  # ordered by latency
    write(report, tmp_path / "frontier.json")
    md = (tmp_path / "frontier.md").read_text()
    assert "| large (measured on other cpu) | 12.0 / 12.2 | 0.400 | 0.470 | +0.070 | 0.94 |" in md
    assert "| default (this run) | 6.0 / 6.1 | 0.350 | 0.450 | +0.100 | 0.90 |" in md
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"record 'bad' lacks \['distilled_ap'"):
        build_frontier({"environment": _env(), "results": results}, summary,
                       {"sizes": [{"name": "bad", "baseline_ap": 0.1, "baseline_p50_ms": 1.0, "distilled_p50_ms": 1.0}]})


def test_triton_repository_declares_the_contract(onnx_model, tmp_path):
    _, path = onnx_model
    target = write_model_repository(path, tmp_path / "repo", "det", max_batch=4, instance="KIND_CPU")
    config = (target / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 4" in config
    assert 'name: "images", data_type: TYPE_FP32, dims: [ 3, 64, 64 ]' in config
    assert 'name: "labels", data_type: TYPE_INT64, dims: [ 20 ]' in config and "KIND_CPU" in config
    assert (target / "1" / "model.onnx").read_bytes() == path.read_bytes()
    assert (target / "labels.txt").read_text().split() == ["__background__", "a", "b", "c"]


def test_triton_defaults_follow_the_artefact_and_cover_openvino_and_engines(onnx_model, tmp_path):
    from detkd.runtime.metadata import engine_sidecar, read_model_info

    _, path = onnx_model
    int8 = tmp_path / "distilled_int8.onnx"
    int8.write_bytes(path.read_bytes())
    target = write_model_repository(int8, tmp_path / "repo")  # onnxruntime on the CPU, named after the file
    config = (target / "config.pbtxt").read_text()
    assert target.name == "detkd_distilled_int8" and 'name: "detkd_distilled_int8"' in config
    assert 'platform: "onnxruntime_onnx"' in config and "kind: KIND_CPU" in config
    target = write_model_repository(int8, tmp_path / "repo", runtime="openvino")
    config = (target / "config.pbtxt").read_text()
    assert target.name == "detkd_distilled_int8_openvino" and 'backend: "openvino"' in config
    assert 'default_model_filename: "model.onnx"' in config and "kind: KIND_CPU" in config and "bf16" in config
    assert (target / "1" / "model.onnx").is_file()
    engine = tmp_path / "distilled_fp16.engine"
    engine.write_bytes(b"plan")
    engine_sidecar(engine).write_text(json.dumps({"metadata": read_model_info(path).to_metadata(), "max_batch": 2}))
    target = write_model_repository(engine, tmp_path / "repo")
    config = (target / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "kind: KIND_GPU" in config and (target / "1" / "model.plan").is_file()
    assert "max_batch_size: 2" in config  # the engine's profile, from its sidecar (ONNX files default to 8)
    assert "max_batch_size: 8" in (write_model_repository(int8, tmp_path / "repo") / "config.pbtxt").read_text()
    with pytest.raises(ModelFileError, match=r"max batch 4 is above the engine's profile \(2, from distilled_fp16.engine.json\)"):
        write_model_repository(engine, tmp_path / "repo", max_batch=4)
    with pytest.raises(ModelFileError, match="the tensorrt backend takes a TensorRT engine"):
        write_model_repository(int8, tmp_path / "repo", runtime="tensorrt")
    with pytest.raises(ModelFileError, match="the openvino backend takes an ONNX file"):
        write_model_repository(engine, tmp_path / "repo", runtime="openvino")


def test_load_runner_picks_the_runtime_and_refuses_mismatches(onnx_model, tmp_path):
    _, path = onnx_model
    assert load_runner(path).backend == "onnxruntime-cpu"
    with pytest.raises(ModelFileError, match="TensorRT runs engines built from ONNX files"):
        load_runner(path, "tensorrt")
    with pytest.raises(ModelFileError, match="unknown runtime 'tflite'; choose from onnxruntime, openvino, tensorrt"):
        load_runner(path, "tflite")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(ModelFileError, match="a TensorRT engine runs only on the tensorrt runtime, not openvino"):
        load_runner(engine, "openvino")


def test_infer_cli_on_openvino_gives_the_onnxruntime_detections(onnx_model, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")
    _, path = onnx_model
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    reports = {}
    for backend in ("onnxruntime", "openvino"):
        proc = subprocess.run([sys.executable, str(REPO / "deploy" / "infer.py"), "--model", str(path), str(image),
                               "--backend", backend, "--out", str(tmp_path / backend), "--score-threshold", "0.0",
                               "--no-draw"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"({backend}-cpu)" in proc.stdout
        reports[backend] = json.loads((tmp_path / backend / "detections.json").read_text())[str(image)]
    assert len(reports["openvino"]) == len(reports["onnxruntime"]) > 0
    for a, b in zip(reports["onnxruntime"], reports["openvino"]):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-3
        assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) < 0.1


def test_infer_cli_writes_detections_and_drawings(onnx_model, tmp_path):
    _, path = onnx_model
    rng = np.random.default_rng(3)
    files = []
    for i, shape in enumerate([(64, 64, 3), (40, 80, 3)]):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(files[-1])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "deploy" / "infer.py"), "--model", str(path), *map(str, files),
                           "--out", str(out), "--score-threshold", "0.0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "detections.json").read_text())
    assert set(report) == {str(f) for f in files}
    first = report[str(files[1])][0]
    assert set(first) == {"box", "score", "label", "class_name"} and first["class_name"] in {"a", "b", "c"}
    assert 0 <= first["box"][0] <= first["box"][2] <= 80 and first["box"][3] <= 40
    assert (out / "img0.png").is_file() and (out / "img1.png").is_file()
    # an unreadable image: one line, exit status 2, nothing half-written
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    proc = subprocess.run([sys.executable, str(REPO / "deploy" / "infer.py"), "--model", str(path), str(bad),
                           "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "bad.png" in proc.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.fault
def test_infer_cli_skips_a_bad_image_keeps_same_named_drawings_and_checks_batch_size(onnx_model, tmp_path):
    _, path = onnx_model
    rng = np.random.default_rng(5)
    files = []
    for folder in ("a", "b"):  # two inputs named x.png
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "x.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(files[-1])
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((2, 2000, 3), np.uint8)).save(thin)
    infer = [sys.executable, str(REPO / "deploy" / "infer.py"), "--model", str(path)]
    out = tmp_path / "out"
    proc = subprocess.run([*infer, str(files[0]), str(thin), str(files[1]), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "thin.png" in proc.stderr and "too thin" in errors[0] and "1 of 3" in errors[1]
    assert set(json.loads((out / "detections.json").read_text())) == {str(f) for f in files}
    assert (out / "x.png").is_file() and (out / "x-2.png").is_file()
    proc = subprocess.run([*infer, str(files[0]), "--batch-size", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--batch-size must be >= 1" in proc.stderr


def test_output_comparison_respects_an_engines_batch_limit(onnx_model):
    """Runners with a profile limit (TensorRT engines) get the sample images in chunks."""
    from detkd.export.gate import compare_outputs

    model, path = onnx_model
    runner = load_runner(path)
    runner.max_batch = 2
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(5)]
    result = compare_outputs(model, runner, images)
    assert result["images"] == 5 and result["passed"] and result["matched"] > 0


def test_a_quantized_artefact_that_fails_its_gate_is_recorded_and_moved_out_of_the_deployment_set(tmp_path):
    from detkd.export.stage import rejected, settle

    def gate(ap, passed):
        return {"metrics": {"AP": ap}, "ap_gate": ap_gate(0.50, ap, 0.01), "passed": passed}

    out = tmp_path / "export"
    out.mkdir()
    for name in ("m.onnx", "m_int8.onnx", "m_fp16.onnx"):
        (out / name).write_bytes(b"x")
    logs = []
    int8 = settle({"path": str(out / "m_int8.onnx"), "precision": "int8",
                   "gates": {"onnxruntime-cpu": gate(0.46, False), "openvino-cpu": gate(0.47, False)}}, out, logs.append)
    assert int8["status"] == "rejected" and int8["deployable_on"] == []
    assert not (out / "m_int8.onnx").exists() and (out / "rejected" / "m_int8.onnx").is_file()
    assert int8["path"] == str(out / "rejected" / "m_int8.onnx") and int8["gates"]["openvino-cpu"]["metrics"]["AP"] == 0.47
    assert "m_int8.onnx REJECTED" in logs[0] and "AP 0.4600 vs 0.5000" in logs[0] and "FP32 file stays" in logs[0]
    fp16 = settle({"path": str(out / "m_fp16.onnx"), "precision": "fp16",
                   "gates": {"onnxruntime-cpu": gate(0.50, True), "openvino-cpu": gate(0.47, False)}}, out, logs.append)
    assert fp16["status"] == "deployable" and fp16["deployable_on"] == ["onnxruntime-cpu"] and (out / "m_fp16.onnx").is_file()
    report = {"models": {"m": {"artefacts": {"fp32": {"precision": "fp32", "status": "deployable"}, "int8": int8,
                                             "fp16": fp16}, "engines": {}}}}
    assert rejected(report) == ["m int8 (onnxruntime-cpu AP 0.4600, openvino-cpu AP 0.4700; allowed drop 0.01)"]


def test_benchmark_interleaves_rows_so_a_slow_phase_hits_every_row():
    from detkd.bench.run import _interleaved

    order = []
    jobs = [(name, lambda name=name: order.append(name), None) for name in ("a", "b", "c")]
    seconds = _interleaved(jobs, warmup=5, iterations=7, rounds=3, description="t")
    assert {k: len(v) for k, v in seconds.items()} == {"a": 7, "b": 7, "c": 7}  # 3 + 2 + 2 timed calls each
    # pass 1: warm-up 5 + 3 timed per row; passes 2 and 3: 3 untimed + 2 timed; rows alternate pass by pass
    assert order == ["a"] * 8 + ["b"] * 8 + ["c"] * 8 + (["a"] * 5 + ["b"] * 5 + ["c"] * 5) * 2


def test_warmup_runs_for_a_count_and_a_time():
    calls = []
    time_callable(lambda: calls.append(1), warmup=2, iterations=1, warmup_seconds=0.05)
    assert len(calls) > 3  # 2 calls would take microseconds; the warm-up lasted 50 ms
    calls.clear()
    time_callable(lambda: calls.append(1), warmup=4, iterations=1, warmup_seconds=0.0)
    assert len(calls) == 5


def test_thread_counts_tried_per_cpu_row():
    import os

    from detkd.bench.run import cpu_thread_options

    assert cpu_thread_options(4, tune=True) == [4, 1] and cpu_thread_options(4, tune=False) == [4]
    assert cpu_thread_options(1, tune=True) == [1]
    assert cpu_thread_options(0, tune=True) == ([0, 1] if (os.cpu_count() or 1) > 1 else [0])
