#!/usr/bin/env python3
"""Run an exported detkd detector on images: detections as JSON and images with the boxes drawn.

    python deploy/infer.py --model models/export/distilled.onnx IMAGE [IMAGE ...] [--out deploy/out]

``--model`` is any gated artefact of ``dvc repro export``: an ONNX file of any precision
(``distilled.onnx``, ``distilled_fp16.onnx``, ``distilled_int8.onnx``) or a TensorRT engine (``.engine``, with
its ``.engine.json``). ``--backend`` picks the runtime: ``onnxruntime`` (default for ONNX;
``--provider cpu|cuda|tensorrt``), ``openvino`` (CPU, f32 inference precision unless ``--ov-precision``)
or ``tensorrt`` (default for engines). Writes ``<out>/detections.json``
(``{image: [{box: [x0, y0, x1, y1], score, label, class_name}]}``, boxes in image pixels) and
``<out>/<image stem>.png`` (``<stem>-2.png``... when inputs share a name). Images are read as displayed:
EXIF orientation applied, 16-bit greyscale scaled to 8 bits, transparency composited over white. An
image that cannot be used is reported in one line and skipped; the others run (exit status 1 then,
2 when none could). Needs numpy, pillow, the runtime and the ``detkd`` package (torch only for
engines). Model errors (missing or corrupt model, runtime absent, engine from another GPU or TensorRT)
are one line on stderr and exit status 2.
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


def drawing_names(paths: list[str]) -> dict[str, str]:
    """``<stem>.png`` per input; inputs sharing a stem (``a/x.jpg``, ``b/x.jpg``) get ``<stem>-2.png``, ...
    in input order, so no drawing overwrites another."""
    names, used = {}, set()
    for path in paths:
        stem, n = Path(path).stem, 1
        name = f"{stem}.png"
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        names[path] = name
    return names


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
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse images with more pixels (default: Pillow's decompression-bomb limit, about 89 M)")
    args = parser.parse_args(argv)
    if args.max_pixels is not None:
        if args.max_pixels < 1:
            parser.error(f"--max-pixels must be >= 1, got {args.max_pixels}")
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = args.max_pixels

    from detkd.errors import DetkdError
    from detkd.runtime import load_runner
    from detkd.runtime.preprocess import check_detectable, read_image

    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        backend = args.backend or ("onnxruntime" if args.model.endswith(".onnx") else "tensorrt")
        options = {"onnxruntime": {"providers": (args.provider,), "threads": args.threads},
                   "openvino": {"threads": args.threads, "precision": args.ov_precision}}.get(backend, {})
        runner = load_runner(args.model, backend, **options)
    except DetkdError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    paths, images, skipped = [], [], []
    for path in args.images:  # one bad image is reported and skipped; the others still run
        try:
            image = read_image(path)
            check_detectable(image.shape, runner.info, name=path)
        except DetkdError as exc:
            skipped.append(path)
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            continue
        paths.append(path)
        images.append(image)
    if not images:
        return 2
    try:
        results = runner.detect(images, batch_size=args.batch_size)
    except DetkdError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drawings = drawing_names(paths)
    report = {}
    for path, image, det in zip(paths, images, results):
        keep = det["scores"] >= args.score_threshold
        kept = {k: (v[keep] if not isinstance(v, list) else [n for n, m in zip(v, keep) if m]) for k, v in det.items()}
        report[path] = [{"box": [round(float(c), 2) for c in box], "score": round(float(score), 4), "label": int(label),
                         "class_name": name}
                        for box, score, label, name in zip(kept["boxes"], kept["scores"], kept["labels"], kept["class_names"])]
        if not args.no_draw:
            draw(image, kept, out / drawings[path])
        print(f"{path}: {len(report[path])} detections >= {args.score_threshold}")
    (out / "detections.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'detections.json'} ({runner.backend})")
    if skipped:
        print(f"error: {len(skipped)} of {len(args.images)} images skipped (reasons above); the others were written",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
