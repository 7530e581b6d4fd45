#!/usr/bin/env python3
"""Write a Triton Inference Server model repository for an exported detkd detector.

    python deploy/triton.py --model models/export/distilled_int8.onnx                      # onnxruntime, CPU
    python deploy/triton.py --model models/export/distilled_int8.onnx --backend openvino   # OpenVINO, CPU
    python deploy/triton.py --model models/export/distilled_fp16.engine                    # TensorRT, GPU

The model name defaults to detkd_<file stem> (plus _openvino), the instance kind to CPU for onnxruntime and
OpenVINO and to GPU for TensorRT engines. Then:
    docker run -p 8000:8000 -v $PWD/deploy/model_repository:/models \\
        nvcr.io/nvidia/tritonserver:<release>-py3 tritonserver --model-repository=/models
(add --gpus all for engines; an engine must have been built with that Triton release's TensorRT, on that GPU).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported .onnx file (any precision) or TensorRT engine")
    parser.add_argument("--repository", default="deploy/model_repository")
    parser.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt"],
                        help="Triton backend (default: onnxruntime for .onnx, tensorrt for engines)")
    parser.add_argument("--name", help="model name (default: detkd_<file stem>)")
    parser.add_argument("--max-batch", type=int,
                        help="Triton's max_batch_size (default: 8 for ONNX; an engine's own profile limit, from its sidecar)")
    parser.add_argument("--instance", choices=["KIND_CPU", "KIND_GPU"],
                        help="default: KIND_CPU for onnxruntime/OpenVINO, KIND_GPU for TensorRT")
    args = parser.parse_args(argv)

    from detkd.errors import DetkdError
    from detkd.runtime.triton import write_model_repository

    try:
        target = write_model_repository(args.model, args.repository, args.name, args.max_batch, args.instance,
                                        args.backend)
    except DetkdError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {target}/config.pbtxt and {target}/1/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
