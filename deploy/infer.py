#!/usr/bin/env python3
"""Run an exported detkd detector on images: detections as JSON and images with the boxes drawn.

    python deploy/infer.py --model models/export/distilled.onnx IMAGE [IMAGE ...] [--out deploy/out]

``--model`` is any gated artefact of ``dvc repro export``: an ONNX file of any precision
(``distilled.onnx``, ``distilled_fp16.onnx``, ``distilled_int8.onnx``) or a TensorRT engine (``.engine``, with
its ``.engine.json``). ``--backend`` picks the runtime: ``onnxruntime`` (default for ONNX;
``--provider cpu|cuda|tensorrt``), ``openvino`` (CPU, f32 inference precision unless ``--ov-precision``)
or ``tensorrt`` (default for engines). Writes ``<out>/detections.json``
(``{image: [{box: [x0, y0, x1, y1], score, label, class_name}]}``, boxes in image pixels) and
``<out>/<image stem>.png``. Needs numpy, pillow, the runtime and the ``detkd`` package (torch only for
engines). Errors (missing or corrupt model, runtime absent, engine from another GPU or TensorRT,
unreadable image) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]


def draw(image, detections: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    pen = ImageDraw.Draw(canvas)
    for box, score, label, name in zip(detections["boxes"], detections["scores"], detections["labels"],
                                       detections["class_names"]):
        colour = COLOURS[(int(label) - 1) % len(COLOURS)]
        pen.rectangle([float(v) for v in box], outline=colour, width=max(1, min(canvas.size) // 200))
        pen.text((float(box[0]) + 2, float(box[1]) + 1), f"{name} {score:.2f}", fill=colour)
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported .onnx file (any precision) or TensorRT .engine")
    parser.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt"],
                        help="runtime (default: onnxruntime for .onnx, tensorrt for engines)")
    parser.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    parser.add_argument("--out", default="deploy/out", help="output directory (default: deploy/out)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="report detections at or above this score")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="onnxruntime provider")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of onnxruntime/OpenVINO (0: all cores)")
    parser.add_argument("--ov-precision", default="f32", choices=["f32", "bf16"],
                        help="OpenVINO inference precision (default f32; bf16 drifts on CPUs that have it)")
    parser.add_argument("--no-draw", action="store_true", help="write detections.json only")
    args = parser.parse_args(argv)

    from detkd.errors import DetkdError
    from detkd.runtime import load_runner
    from detkd.runtime.preprocess import read_image

    try:
        backend = args.backend or ("onnxruntime" if args.model.endswith(".onnx") else "tensorrt")
        options = {"onnxruntime": {"providers": (args.provider,), "threads": args.threads},
                   "openvino": {"threads": args.threads, "precision": args.ov_precision}}.get(backend, {})
        runner = load_runner(args.model, backend, **options)
        images = [read_image(p) for p in args.images]
        results = runner.detect(images, batch_size=args.batch_size)
    except DetkdError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for path, image, det in zip(args.images, images, results):
        keep = det["scores"] >= args.score_threshold
        kept = {k: (v[keep] if not isinstance(v, list) else [n for n, m in zip(v, keep) if m]) for k, v in det.items()}
        report[path] = [{"box": [round(float(c), 2) for c in box], "score": round(float(score), 4), "label": int(label),
                         "class_name": name}
                        for box, score, label, name in zip(kept["boxes"], kept["scores"], kept["labels"], kept["class_names"])]
        if not args.no_draw:
            draw(image, kept, out / f"{Path(path).stem}.png")
        print(f"{path}: {len(report[path])} detections >= {args.score_threshold}")
    (out / "detections.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'detections.json'} ({runner.backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
