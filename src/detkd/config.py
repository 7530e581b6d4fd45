"""``params.yaml`` -> typed, validated configuration.

Contract: ``load_params(path)`` returns a frozen ``Params`` or raises ``ConfigError`` with one line that
names the file, the dotted key, the bad value and what is allowed. Unknown keys are errors (a typo must
never silently fall back to a default). The YAML holds values only; nothing in it builds objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from detkd.errors import ConfigError

BACKBONE_NAMES = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "mobilenet_v3_small",
                         "regnet_x_400mf", "regnet_x_800mf"]
BACKBONES = BACKBONE_NAMES.__args__
FAMILIES = ("fasterrcnn", "retinanet")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticConfig(_Section):
    """Shape of the generated default dataset (see ``detkd.data.synthetic``)."""

    num_train: int = Field(600, ge=1)
    num_val: int = Field(150, ge=1)
    image_size: int = Field(128, ge=32, le=4096)
    num_classes: int = Field(4, ge=1, le=8)
    max_objects: int = Field(8, ge=1, le=100)
    empty_fraction: float = Field(0.08, ge=0.0, le=1.0)
    min_object_size: float = Field(8.0, gt=1.0)
    max_object_size: float = Field(64.0, gt=1.0)
    clutter: int = Field(8, ge=0, le=200)
    max_occlusion: float = Field(0.6, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sizes_ordered(self) -> "SyntheticConfig":
        if self.min_object_size > self.max_object_size:
            raise ValueError(
                f"min_object_size ({self.min_object_size}) must be <= max_object_size ({self.max_object_size})"
            )
        if self.max_object_size >= self.image_size:
            raise ValueError(f"max_object_size ({self.max_object_size}) must be < image_size ({self.image_size})")
        return self


class CocoConfig(_Section):
    """Layout of a real COCO 2017 directory, relative to ``data.root``."""

    train_images: str = "train2017"
    val_images: str = "val2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_annotations: str = "annotations/instances_val2017.json"


class DataConfig(_Section):
    source: Literal["synthetic", "coco"] = "synthetic"
    root: Optional[str] = None  # the COCO directory when source == coco
    min_box_size: float = Field(1.0, ge=0.0)  # boxes smaller than this (px, after clipping) are dropped
    # share of the train images held out as the 'dev' split (hyper-parameters are chosen on it, never on
    # val); the rest is the 'fit' split. 0 carves nothing (then `make compare` cannot tune).
    dev_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    synthetic: SyntheticConfig = SyntheticConfig()
    coco: CocoConfig = CocoConfig()

    @model_validator(mode="after")
    def _root_for_coco(self) -> "DataConfig":
        if self.source == "coco" and not self.root:
            raise ValueError("data.root must name the COCO 2017 directory when data.source is 'coco'")
        return self


class _SharedInput(_Section):
    """What teacher and student must share: the input they see, its normalisation, the anchors."""

    min_size: int = Field(128, ge=32)
    max_size: int = Field(128, ge=32)
    # One base anchor size (px, in the resized input) per pyramid level: P2..P6 for Faster R-CNN, the
    # ``retinanet_levels`` for RetinaNet (which adds the octave scales 2^0, 2^(1/3), 2^(2/3) of each).
    anchor_sizes: list[float] = Field(default_factory=lambda: [8.0, 16.0, 32.0, 64.0, 128.0], min_length=5, max_length=5)
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    image_mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406], min_length=3, max_length=3)
    image_std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225], min_length=3, max_length=3)
    rpn_batch_size_per_image: int = Field(256, ge=1)
    score_threshold: float = Field(0.05, ge=0.0, le=1.0)
    # Multi-scale RoI pooling (the Faster R-CNN box head, DSIG/GID node features): an RoI of this side (px,
    # resized input) is pooled from P4, half of it from P3, and so on (torchvision's 224 is for ~800 px inputs).
    roi_canonical_size: int = Field(224, ge=1)
    # RetinaNet's pyramid: "p2-p6" (strides 4..64, P6 by max-pooling P5, as Faster R-CNN's) or torchvision's
    # "p3-p7" (strides 8..128, P6/P7 by strided convs), which is sized for ~800 px inputs.
    retinanet_levels: Literal["p2-p6", "p3-p7"] = "p2-p6"

    @model_validator(mode="after")
    def _positive(self) -> "_SharedInput":
        for name in ("anchor_sizes", "aspect_ratios", "image_std"):
            values = getattr(self, name)
            if any(v <= 0 for v in values):
                raise ValueError(f"{name} must all be > 0, got {values}")
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        return self


class ModelConfig(_SharedInput):
    """The ``model`` section: the detector family and what teacher and student share (distillation compares
    their pyramids level by level on one batch). What changes a network's cost is per role (``NetworkConfig``)."""

    family: Literal["fasterrcnn", "retinanet"] = "fasterrcnn"


class TwoStageArch(_Section):
    """Per-role cost of a Faster R-CNN: RPN proposals kept (train and test), RoIs sampled per image for the
    box head's loss, and the box head's representation size (its two FC layers)."""

    representation_size: int = Field(256, ge=8, le=4096)
    rpn_pre_nms_top_n_train: int = Field(1000, ge=1, le=100000)
    rpn_post_nms_top_n_train: int = Field(500, ge=1, le=100000)
    rpn_pre_nms_top_n_test: int = Field(500, ge=1, le=100000)
    rpn_post_nms_top_n_test: int = Field(300, ge=1, le=100000)
    box_batch_size_per_image: int = Field(64, ge=1, le=100000)  # sampled RoIs per image (training)

    @model_validator(mode="after")
    def _post_le_pre(self) -> "TwoStageArch":
        for phase in ("train", "test"):
            pre, post = getattr(self, f"rpn_pre_nms_top_n_{phase}"), getattr(self, f"rpn_post_nms_top_n_{phase}")
            if post > pre:
                raise ValueError(f"rpn_post_nms_top_n_{phase} ({post}) must be <= rpn_pre_nms_top_n_{phase} ({pre})")
        return self


class OneStageArch(_Section):
    """Per-role cost of a RetinaNet: depth of its classification and box towers (their width is the FPN
    width), and the candidates per level kept before NMS at inference."""

    head_depth: int = Field(4, ge=1, le=4)  # torchvision builds 4 convs per tower; fewer are cheaper
    topk_candidates: int = Field(1000, ge=1, le=100000)


class NetworkConfig(_Section):
    """One detector (teacher or student): backbone, optional local weights, and the architecture keys that
    change its cost. ``fasterrcnn`` / ``retinanet`` hold the keys of one family each; only the section of
    ``model.family`` is used, so switching family needs no edit here."""

    backbone: BACKBONE_NAMES
    weights: Optional[str] = None  # a full-detector state dict (.pt), loaded with weights_only=True
    backbone_weights: Optional[str] = None  # a backbone-only (classification) state dict
    fpn_channels: int = Field(128, ge=8, le=1024)  # FPN width (and RetinaNet's head width)
    fpn_norm: bool = False  # BatchNorm after every FPN conv (keeps from-scratch light backbones' features in scale)
    # A backbone that starts from pretrained weights (pretrain stage or backbone_weights) keeps its BatchNorm
    # statistics and affine parameters and does not train its stem and first stage (torchvision's fine-tuning)
    freeze_pretrained: bool = True
    detections_per_image: int = Field(100, ge=1, le=10000)
    fasterrcnn: TwoStageArch = TwoStageArch()
    retinanet: OneStageArch = OneStageArch()


class DetectorConfig(_SharedInput):
    """Everything that builds one detector: ``model`` (shared) merged with one role's architecture keys.
    Stored flat in every checkpoint's ``DetectorSpec``; evaluate, export and benchmark rebuild from it."""

    fpn_channels: int = Field(128, ge=8)
    fpn_norm: bool = False
    freeze_pretrained: bool = True
    detections_per_image: int = Field(100, ge=1)
    # two-stage
    representation_size: int = Field(256, ge=8)
    rpn_pre_nms_top_n_train: int = Field(1000, ge=1)
    rpn_post_nms_top_n_train: int = Field(500, ge=1)
    rpn_pre_nms_top_n_test: int = Field(500, ge=1)
    rpn_post_nms_top_n_test: int = Field(300, ge=1)
    box_batch_size_per_image: int = Field(64, ge=1)
    # one-stage
    head_depth: int = Field(4, ge=1)
    topk_candidates: int = Field(1000, ge=1)


def detector_config(model: ModelConfig, network: NetworkConfig) -> DetectorConfig:
    """The shared ``model`` section merged with one role's architecture keys (its family's section only)."""
    shared = model.model_dump(exclude={"family"})
    role = network.model_dump(include={"fpn_channels", "fpn_norm", "freeze_pretrained", "detections_per_image"})
    family = getattr(network, model.family).model_dump()
    return DetectorConfig.model_validate({**shared, **role, **family})


# Keys whose larger value makes a network wider or deeper; a student above its teacher on one is warned about.
WIDTH_KEYS = ("fpn_channels", "representation_size", "head_depth")


class TrainConfig(_Section):
    """One training schedule. The baseline and distilled students share ``train_student``."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(0.001, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: list[float] = Field(default_factory=lambda: [0.67, 0.89])  # fractions of training
    warmup_iters: int = Field(50, ge=0)
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    grad_clip: Optional[float] = Field(10.0, gt=0.0)
    amp: bool = True  # used on CUDA only
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(200, ge=1)  # iterations between resumable checkpoints
    log_every: int = Field(10, ge=1)
    # Overrides the top-level ``seed`` for this stage's initialisation, data order and flips (not for the
    # data, which the top-level seed generates): several student seeds on one dataset and one teacher.
    seed: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _milestones(self) -> "TrainConfig":
        if any(not 0.0 < m < 1.0 for m in self.step_milestones):
            raise ValueError(f"step_milestones must be fractions in (0, 1), got {self.step_milestones}")
        return self


HParams = dict[str, float | int | bool]


class MethodHParams(_Section):
    """One family's hyper-parameters per method (constructor keyword arguments, checked against the
    method's signature before training starts). Unset keys take the method's published values for the
    family (``DistillMethod.published``)."""

    none: HParams = Field(default_factory=dict)
    fitnet: HParams = Field(default_factory=dict)
    dsig: HParams = Field(default_factory=dict)
    drkd: HParams = Field(default_factory=dict)
    gid: HParams = Field(default_factory=dict)
    defeat: HParams = Field(default_factory=dict)
    mar: HParams = Field(default_factory=dict)


class DistillConfig(_Section):
    """``method`` selects the method; ``<family>.<method>`` holds its hyper-parameters for that detector
    family (the loss weights that ``make compare`` chose on the dev split, and the size-dependent settings).
    Only the section of ``model.family`` is used, so switching family needs no other edit."""

    method: Literal["none", "fitnet", "dsig", "drkd", "gid", "defeat", "mar"] = "dsig"
    fasterrcnn: MethodHParams = MethodHParams()
    retinanet: MethodHParams = MethodHParams()

    def hparams(self, family: str) -> dict:
        """The configured hyper-parameters of ``method`` for ``family`` (published values fill the rest)."""
        return dict(getattr(getattr(self, family), self.method))


class EvalConfig(_Section):
    batch_size: int = Field(8, ge=1)


PRECISIONS = ("fp32", "fp16", "int8")


class PrecisionTolerance(_Section):
    """|AP(artefact) - AP(PyTorch)| allowed per precision; one number sets all three."""

    fp32: float = Field(0.005, ge=0.0, le=1.0)
    fp16: float = Field(0.005, ge=0.0, le=1.0)
    int8: float = Field(0.01, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _one_number_for_all(cls, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {p: float(value) for p in PRECISIONS}
        return value


class GateConfig(_Section):
    """Accuracy gate of every exported artefact against the PyTorch model, on each CPU runtime."""

    max_ap_drop: PrecisionTolerance = PrecisionTolerance()
    sample_images: int = Field(8, ge=1)  # val images whose raw outputs are compared
    box_atol: float = Field(0.05, ge=0.0)  # px
    score_atol: float = Field(1e-3, ge=0.0)
    max_unmatched: float = Field(0.01, ge=0.0, le=1.0)
    runtimes: list[Literal["onnxruntime", "openvino"]] = Field(default_factory=lambda: ["onnxruntime", "openvino"],
                                                              min_length=1)  # CPU runtimes each artefact is gated on


class QuantizeConfig(_Section):
    """INT8 post-training quantization (NVIDIA ModelOpt) of the exported graphs."""

    calibration_images: int = Field(64, ge=1)  # train-split images (never the val split the gate reports)
    calibration_method: Literal["entropy", "max"] = "entropy"


class TensorRTConfig(_Section):
    """Engines built from each gated ONNX artefact (precision comes from the file; strongly typed)."""

    max_batch: int = Field(8, ge=1)  # optimisation profile: batch 1..max_batch
    workspace_gb: float = Field(4.0, gt=0.0)


class ExportConfig(_Section):
    opset: int = Field(17, ge=17, le=20)  # torch's TorchScript exporter writes <= 20; TensorRT 10.15/11 read 9-24
    simplify: bool = True  # onnxslim
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS))
    gate: GateConfig = GateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    tensorrt: TensorRTConfig = TensorRTConfig()
    registered_model: str = "detkd-student"  # MLflow registry name of the deployable student
    alias: str = "deployable"

    @model_validator(mode="after")
    def _fp32_first(self) -> "ExportConfig":
        if "fp32" not in self.precisions:
            raise ValueError(f"export.precisions {self.precisions} must include fp32 (the reference artefact; fp16 "
                             "and int8 are made from it)")
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"export.precisions {self.precisions} lists a precision twice")
        return self


class BenchmarkConfig(_Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    warmup: int = Field(5, ge=0)  # iterations run before timing starts (not timed)
    warmup_seconds: float = Field(1.0, ge=0.0)  # ... and for at least this long (runtimes settle after a time)
    iterations: int = Field(30, ge=1)
    rounds: int = Field(5, ge=1)  # the iterations are split into this many interleaved passes over all rows
    threads: int = Field(0, ge=0)  # CPU threads for PyTorch, onnxruntime and OpenVINO; 0 = every core
    tune_threads: bool = True  # onnxruntime/OpenVINO rows also try 1 thread and keep the faster (recorded per row)
    backends: list[Literal["torch-cpu", "torch-cuda", "onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda",
                           "onnxruntime-tensorrt", "tensorrt"]] = Field(
        default_factory=lambda: ["torch-cpu", "torch-cuda", "onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda",
                                 "onnxruntime-tensorrt", "tensorrt"])

    @model_validator(mode="after")
    def _batches(self) -> "BenchmarkConfig":
        if self.rounds > self.iterations:
            raise ValueError(f"benchmark.rounds {self.rounds} is more than benchmark.iterations {self.iterations}; "
                             "each pass needs at least one timed call")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must all be >= 1, got {self.batch_sizes}")
        return self


class FrontierConfig(_Section):
    """``make frontier``: more student sizes, each trained as baseline and distilled student in a DVC
    experiment. A size is a set of overrides of the ``student`` section (same keys, nested the same way)."""

    sizes: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> "FrontierConfig":
        import re

        for name in self.sizes:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,30}", name):
                raise ValueError(f"size name {name!r} must be lower-case letters, digits, '-' or '_' (it names an experiment)")
        return self


class PretrainConfig(_Section):
    """The ``pretrain`` stage: each role's backbone trained as a classifier of generated one-object images
    (``detkd.pretrain``), the default data's stand-in for ImageNet weights."""

    enabled: bool = True
    iterations: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=2)
    image_size: int = Field(64, ge=32)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    workers: int = Field(1, ge=0)


class Params(_Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    model: ModelConfig = ModelConfig()
    teacher: NetworkConfig = NetworkConfig(backbone="resnet34")
    student: NetworkConfig = NetworkConfig(backbone="resnet18")
    train_teacher: TrainConfig = TrainConfig()
    train_student: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    frontier: FrontierConfig = FrontierConfig()

    @model_validator(mode="after")
    def _frontier_sizes_are_students(self) -> "Params":
        for name, override in self.frontier.sizes.items():
            try:
                NetworkConfig.model_validate(deep_merge(self.student.model_dump(), override))
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    raise ValueError(f"frontier.sizes.{name}.{loc}: unknown key; a size overrides keys of the student "
                                     f"section{_where_it_belongs(('student', *err['loc']))}") from None
                shown = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
                raise ValueError(f"frontier.sizes.{name}.{loc}: {err['msg'].removeprefix('Value error, ')}{shown}") from None
        return self

    def student_size(self, name: str) -> NetworkConfig:
        """The ``student`` section with ``frontier.sizes.<name>`` merged in."""
        return NetworkConfig.model_validate(deep_merge(self.student.model_dump(), self.frontier.sizes[name]))

    def detector_config(self, role: str) -> DetectorConfig:
        """The full architecture of ``role`` (``teacher`` or ``student``): shared ``model`` + its own keys."""
        return detector_config(self.model, getattr(self, role))

    def stage_seed(self, role: str) -> int:
        """Seed of the ``train_<role>`` stage: its own ``seed`` when set, else the top-level one."""
        schedule = getattr(self, f"train_{role}")
        return schedule.seed if schedule.seed is not None else self.seed


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` with ``override`` merged in recursively (override wins on leaves)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_error(source: str, err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    if err["type"] == "extra_forbidden":
        parent: Any = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            parent = field.annotation if field is not None else None
        allowed = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return f"{source}: unknown key '{loc}'; allowed keys here: {', '.join(allowed)}{_where_it_belongs(err['loc'])}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("float_type", "float_parsing", "int_type", "int_parsing") and isinstance(value, str):
        try:
            float(value)
            shown += f"; YAML reads a number without a dot as text: write {float(value)!r}"
        except ValueError:
            pass
    if not loc:  # a rule across sections: its message names the keys
        return f"{source}: {message}"
    return f"{source}: {loc}: {message}{shown}"


# keys that moved, old dotted path -> new one
_MOVED = {**{f"distill.{m}": f"distill.fasterrcnn.{m} / distill.retinanet.{m} (hyper-parameters are set per family)"
             for m in ("none", "fitnet", "dsig", "drkd", "gid", "defeat", "mar")},
          "export.tensorrt.precisions": "export.precisions (each precision is an ONNX file; engines are built from them)",
          "export.tensorrt.calibration_images": "export.quantize.calibration_images (train-split images)"}


def _where_it_belongs(loc: tuple) -> str:
    """A hint for a key put in the wrong section (``model.fpn_channels``, a Faster R-CNN key under
    ``retinanet``, a key that moved...): where that key lives, or "" when there is nothing to say."""
    dotted = ".".join(str(part) for part in loc)
    if dotted in _MOVED:
        return f" (it moved to {_MOVED[dotted]})"
    key = str(loc[-1])
    homes = {name: "" for name in ("fpn_channels", "fpn_norm", "detections_per_image")}
    homes.update({name: ".fasterrcnn" for name in TwoStageArch.model_fields})
    homes.update({name: ".retinanet" for name in OneStageArch.model_fields})
    if key not in homes:
        return ""
    role = str(loc[0]) if str(loc[0]) in ("teacher", "student") else None
    roles = [role] if role else ["teacher", "student"]
    family = homes[key].lstrip(".") or "both families"
    return (f" ({key} is an architecture key of {family}, set per role: "
            + " / ".join(f"{r}{homes[key]}.{key}" for r in roles) + ")")


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a plain dict (as read from YAML) into ``Params``; raise ``ConfigError`` on the first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc.errors()[0], Params)) from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path):
    """The YAML document at ``path``; ``ConfigError`` naming the file, and the line where YAML says
    where, for a missing file, text that is not UTF-8, a syntax error or a key given twice."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} not valid YAML: {problem}") from None


def load_params(path: str | Path = "params.yaml", overrides: Optional[dict] = None) -> Params:
    """Read and validate ``path``; ``overrides`` (a nested dict) is merged on top before validation.
    An empty file is refused (running silently on defaults would hide a lost file)."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; restore it (git checkout {path.name}) or write its sections")
    if overrides:
        raw = deep_merge(raw or {}, overrides)
    return parse_params(raw, str(path))
