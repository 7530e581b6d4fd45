"""Train one detector (teacher or baseline student) from params: the ``train_*`` stages' library half.

Contract: ``train_detector(params, role, data_dir, out, ...)`` builds the ``role`` network declared in
params, trains it on the prepared train split with ``train_<role>``'s schedule, and writes a model
checkpoint (state dict + metadata: spec, classes, provenance, timing) to ``out``. Only rank 0 writes.
Periodic training states live in ``state_dir`` so an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from detkd.cli import fingerprint, seed_everything
from detkd.config import Params
from detkd.data.dataset import DetectionDataset, load_manifest, open_split
from detkd.engine.checkpoint import save_model_checkpoint
from detkd.engine.distributed import DistInfo, barrier, pick_device
from detkd.engine.trainer import TrainResult, train
from detkd.models.builder import build_detector, make_spec
from detkd.pretrain import backbone_start
from detkd.tracking.mlflow_run import git_commit


def train_detector(
    params: Params,
    role: str,
    data_dir: str | Path,
    out: str | Path,
    state_dir: Optional[str | Path] = None,
    dist_info: DistInfo = DistInfo(),
    on_log=None,
    run_id: Optional[str] = None,
    teacher_path: Optional[str | Path] = None,
    split: str = "train",
    pretrained_dir: Optional[str | Path] = None,
) -> TrainResult:
    """With ``teacher_path`` the student is distilled from that teacher with ``params.distill``: same
    initialisation (seed), data order and schedule as the baseline student, plus the method's terms.
    The stage's seed is ``train_<role>.seed`` when set, else the top-level ``seed``. ``split`` is the
    manifest split trained on (``fit``, train without dev, when tuning hyper-parameters). The backbone
    starts from the role's ``backbone_weights`` when set, else from the ``pretrain`` stage's file for the
    role in ``pretrained_dir`` (if that stage made one), else from scratch."""
    network = getattr(params, role)
    schedule = getattr(params, f"train_{role}")
    index = open_split(data_dir, split, params.data.min_box_size)
    spec = make_spec(params.model.family, network.backbone, index.num_classes, params.detector_config(role))
    seed = params.stage_seed(role)
    seed_everything(seed)
    backbone_init = backbone_start(params, role, pretrained_dir)
    model = build_detector(spec, network.weights, backbone_init)
    device = pick_device(dist_info)
    key = fingerprint(spec.to_dict(), schedule.model_dump(), network.model_dump(), seed, load_manifest(data_dir), split,
                      backbone_init)
    module, distill_meta = model, None
    if teacher_path is not None:
        module, distill_meta = build_distillation_model(params, model, spec, index, teacher_path)
        key = fingerprint(key, distill_meta)
    state_path = Path(state_dir) / "state.pt" if state_dir else None
    result = train(
        module, DetectionDataset(index), schedule, seed=seed, device=device, dist_info=dist_info,
        state_path=state_path, fingerprint=key, on_log=on_log,
        description=f"distill {role} ({params.distill.method})" if distill_meta else f"train {role}",
    )
    if dist_info.is_main:
        meta = {
            "spec": spec.to_dict(),
            "role": role,
            "category_ids": index.category_ids,
            "category_names": index.category_names,
            "train_split": split,
            "backbone_init": backbone_init or "",
            "git_commit": git_commit(),
            "mlflow_run_id": run_id or "",
            "train": {
                "iterations": result.iterations,
                "seconds": result.seconds,
                "seconds_per_iter": result.seconds_per_iter,
                "peak_memory_mb": result.peak_memory_mb,
            },
        }
        if distill_meta:
            meta["distill"] = distill_meta
        save_model_checkpoint(out, model, meta)
        if state_path is not None and state_path.exists():
            state_path.unlink()  # finished: the final checkpoint supersedes the resumable state
    barrier(dist_info)
    return result


def build_distillation_model(params: Params, student: torch.nn.Module, spec, index, teacher_path):
    """Wrap ``student`` with the frozen teacher and the configured method; every check runs here, before
    any training step (unknown method, family it cannot serve, bad hyper-parameter, incompatible teacher)."""
    from detkd.distill import build_method
    from detkd.distill.base import resolve_hparams
    from detkd.distill.wrapper import DistillationModel, check_compatible

    method_name = params.distill.method
    hparams = resolve_hparams(method_name, spec.family, params.distill.hparams(spec.family))
    teacher, teacher_meta = load_detector(teacher_path)
    for line in teacher_notes(params, spec, teacher_meta, teacher_path):
        print(line)
    student_meta = {"category_ids": index.category_ids}
    check_compatible(student, teacher, student_meta, teacher_meta)
    from detkd.models.builder import DetectorSpec, spec_config

    teacher_width = spec_config(DetectorSpec.from_dict(teacher_meta["spec"])).fpn_channels
    method = build_method(method_name, spec.family, spec.model["fpn_channels"], teacher_width, hparams)
    meta = {"method": method_name, "hparams": hparams, "teacher": str(teacher_path),
            "teacher_backbone": teacher_meta["spec"]["backbone"]}
    return DistillationModel(student, teacher, method), meta


def teacher_notes(params: Params, student_spec, teacher_meta: dict, teacher_path) -> list[str]:
    """One line per thing a user should know about the teacher that distillation uses: its checkpoint's
    architecture differs from what params say (the checkpoint's is used: its weights fit only that), or the
    student is set wider or deeper than the teacher on a key (allowed, but rarely what compression wants)."""
    from detkd.config import WIDTH_KEYS
    from detkd.models.builder import DetectorSpec, spec_config

    teacher_spec = DetectorSpec.from_dict(teacher_meta["spec"])
    built, declared = spec_config(teacher_spec).model_dump(), params.detector_config("teacher").model_dump()
    student = spec_config(student_spec).model_dump()
    lines = []
    differ = [(k, built[k], v) for k, v in declared.items() if built[k] != v]
    if teacher_spec.backbone != params.teacher.backbone:
        differ.insert(0, ("backbone", teacher_spec.backbone, params.teacher.backbone))
    if differ:
        shown = ", ".join(f"{k}={ckpt} (params: {want})" for k, ckpt, want in differ[:4])
        lines.append(f"distill: warning: using the teacher as built in {teacher_path}: {shown}"
                     f"{' ...' if len(differ) > 4 else ''}; its weights fit only its own architecture "
                     "(re-run train_teacher to apply params)")
    wider = [k for k in WIDTH_KEYS if student[k] > built[k] and _family_key(k, student_spec.family)]
    if wider:
        lines.append("distill: warning: the student is wider or deeper than its teacher on "
                     + ", ".join(f"{k} ({student[k]} > {built[k]})" for k in wider)
                     + "; allowed, but the student is meant to be the cheaper network")
    return lines


def _family_key(key: str, family: str) -> bool:
    """Whether architecture key ``key`` means anything for ``family``."""
    from detkd.config import OneStageArch, TwoStageArch

    other = OneStageArch if family == "fasterrcnn" else TwoStageArch
    return key not in other.model_fields


def load_detector(path: str | Path, device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, dict]:
    """Rebuild a detector from a model checkpoint (``weights_only`` load) and put it in eval mode."""
    from detkd.engine.checkpoint import load_model_checkpoint
    from detkd.models.builder import DetectorSpec

    state, meta = load_model_checkpoint(path)
    model = build_detector(DetectorSpec.from_dict(meta["spec"]))
    model.load_state_dict(state)
    return model.to(device).eval(), meta
