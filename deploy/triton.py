#!/usr/bin/env python3
"""Write a Triton Inference Server model repository for an exported detkd detector.

    python deploy/triton.py --model models/export/distilled.onnx --repository deploy/model_repository
    python deploy/triton.py --model models/export/distilled_fp16.engine --name detkd_student_trt

Then: docker run --gpus all -p 8000:8000 -v $PWD/deploy/model_repository:/models
      nvcr.io/nvidia/tritonserver:<release>-py3 tritonserver --model-repository=/models
(the TensorRT engine must have been built with the TensorRT version of that Triton release, on that GPU).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported .onnx file or TensorRT engine")
    parser.add_argument("--repository", default="deploy/model_repository")
    parser.add_argument("--name", default="detkd_student")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--instance", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"])
    args = parser.parse_args(argv)

    from detkd.errors import DetkdError
    from detkd.runtime.triton import write_model_repository

    try:
        target = write_model_repository(args.model, args.repository, args.name, args.max_batch, args.instance)
    except DetkdError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {target}/config.pbtxt and {target}/1/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
