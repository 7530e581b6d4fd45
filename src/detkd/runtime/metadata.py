"""What an exported model says about itself: the metadata stored in the ONNX file (and an engine's sidecar).

Contract: ``ModelInfo.to_metadata()`` -> ``{str: str}`` (ONNX ``metadata_props``; values are JSON), and
``ModelInfo.from_metadata(props, source)`` reads it back or raises ``ModelFileError`` naming the file and
the missing or bad key. ``read_model_info(path)`` reads it from an ONNX file or an engine's sidecar
without opening a runtime session.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

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


def engine_sidecar(engine_path: str | Path) -> Path:
    """Where a TensorRT engine's description (versions, GPU, precision, this metadata) lives."""
    return Path(str(engine_path) + ".json")


def read_model_info(model_path: str | Path) -> ModelInfo:
    """``ModelInfo`` of an exported ``.onnx`` file, or of an engine from its ``<engine>.json`` sidecar."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        import onnx

        try:
            model = onnx.load(str(model_path), load_external_data=False)
        except Exception as exc:
            raise ModelFileError(f"{model_path}: not a readable ONNX file ({str(exc).splitlines()[0][:120]})") from None
        return ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props}, str(model_path))
    sidecar = engine_sidecar(model_path)
    if not sidecar.is_file():
        raise ModelFileError(f"{model_path}: its description {sidecar.name} is missing")
    return ModelInfo.from_metadata(json.loads(sidecar.read_text())["metadata"], str(sidecar))
