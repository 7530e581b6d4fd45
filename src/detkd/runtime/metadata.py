"""What an exported model says about itself: the metadata stored in the ONNX file (and an engine's sidecar).

Contract: ``ModelInfo.to_metadata()`` -> ``{str: str}`` (ONNX ``metadata_props``; values are JSON), and
``ModelInfo.from_metadata(props, source)`` reads it back or raises ``ModelFileError`` naming the file and
the missing or bad key.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields

from detkd.errors import ModelFileError

PREFIX = "detkd."
INPUT_FORMAT = ("float32 NCHW RGB in [0, 1]; image scaled by min(min_size / shorter side, max_size / longer side) "
                "(bilinear), placed top-left and padded with image_mean to input_size x input_size")


@dataclass(frozen=True)
class ModelInfo:
    class_names: list[str]
    category_ids: list[int]
    input_size: int  # square input side S
    min_size: int  # torchvision transform's resize rule
    max_size: int
    image_mean: list[float]
    image_std: list[float]  # applied inside the graph; stated for other runtimes
    max_detections: int
    family: str = ""
    backbone: str = ""
    git_commit: str = "unknown"
    mlflow_run_id: str = ""
    input_format: str = INPUT_FORMAT
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> "ModelInfo":
        values = {}
        for f in fields(cls):
            key = PREFIX + f.name
            if key not in props:
                if f.default is not MISSING or f.default_factory is not MISSING:  # optional
                    continue
                raise ModelFileError(f"{source}: metadata key '{key}' missing; not a detkd export "
                                     "(re-export it with `dvc repro export`)")
            try:
                values[f.name] = json.loads(props[key])
            except json.JSONDecodeError:
                raise ModelFileError(f"{source}: metadata key '{key}' is not valid JSON: {props[key][:60]!r}") from None
        return cls(**values)
