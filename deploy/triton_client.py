#!/usr/bin/env python3
"""Send images to a detkd model served by Triton (HTTP/REST, KServe v2 protocol) and print the detections.

    python deploy/triton_client.py --url localhost:8000 --name detkd_distilled_int8_openvino \\
        --contract models/export/distilled_int8.onnx IMAGE [IMAGE ...]

``--contract`` is the file that was deployed (its metadata holds the input size, the letterbox rule and the
class names; for an engine, its ``.engine``, read through its ``.engine.json``). Images are read and
letterboxed exactly as deploy/infer.py does, and the boxes come back in image pixels. Prints
``{image: [{box, score, label, class_name}]}`` as JSON. Errors are one line on stderr, exit status 2.
Needs numpy, pillow and the ``detkd`` package; the HTTP is Python's standard library.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8000", help="Triton's HTTP endpoint")
    parser.add_argument("--name", required=True, help="model name in the repository (deploy/triton.py printed it)")
    parser.add_argument("--contract", required=True, help="the exported file that the server runs")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)

    from detkd.errors import DetkdError
    from detkd.runtime.preprocess import read_image
    from detkd.runtime.triton_client import TritonHTTPRunner

    try:
        runner = TritonHTTPRunner(args.url, args.name, args.contract, timeout=args.timeout)
        found = runner.detect([read_image(path) for path in args.images], batch_size=1)
    except DetkdError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps({path: [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                              "label": int(label), "class_name": name}
                             for box, score, label, name in zip(d["boxes"], d["scores"], d["labels"], d["class_names"])]
                      for path, d in zip(args.images, found)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
