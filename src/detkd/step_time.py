"""Step-time breakdown of a distillation method: baseline step, teacher forward, distillation step.

Contract: ``measure_step_times(params, data_dir, teacher_path, method)`` trains, on the same batches
and from the same initial student, (a) the baseline student and (b) the distilled student for
``warmup + iters`` optimisation steps each (the training loop's own ``forward_losses`` +
``apply_gradients``), and separately times the frozen teacher's own forward (``teacher_forward``: FPN
features, plus the dense head for methods that read it). The teacher passes a method asks for inside the
distillation step (its RoI head on the method's boxes, its proposals, its classification towers) are
timed where they run (``teacher_on_request``, from ``DistillationModel.teacher_seconds``). The parts are
interleaved per batch so drifts in machine speed hit them alike; medians over ``iters`` steps after
``warmup`` are reported. The time a method adds beyond the teacher's computation (``overhead``) is the
median over batches of ``distill_step - baseline_step - teacher_forward - teacher_on_request`` taken on
the same batch (with its interquartile range, ``overhead_iqr``): its losses, adapters, its own RoI
pooling, sampling and selection, and their backward passes. Pairing by batch cancels the machine's slow
phases and the batches' differing object counts, which differences of separate medians do not.

``python -m detkd.step_time --teacher models/teacher.pt`` prints the breakdown of every method for
params.yaml's family on this machine (``--family retinanet --teacher cmp-retina-teacher`` takes the teacher
of a DVC experiment; ``--json`` also writes the numbers).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from detkd.cli import seed_everything
from detkd.config import Params
from detkd.data.dataset import DetectionDataset, EpochSampler, make_loader, open_split
from detkd.engine.optim import build_optimizer
from detkd.engine.trainer import to_device, apply_gradients, forward_losses
from detkd.models.builder import build_detector, make_spec
from detkd.models.view import transform_batch
from detkd.pretrain import backbone_start
from detkd.training import build_distillation_model


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class _Trainee:
    """A module with its optimiser, stepped exactly as the training loop steps it."""

    def __init__(self, module: torch.nn.Module, params_cfg, device: torch.device):
        self.module = module.to(device).train()
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trainable, params_cfg)
        self.use_amp = params_cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.grad_clip = params_cfg.grad_clip

    def step(self, images, targets) -> None:
        _, loss = forward_losses(self.module, images, targets, self.use_amp)
        apply_gradients(loss, self.optimizer, self.scaler, self.trainable, self.grad_clip)


def _quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile (the values themselves when fewer than 2)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def measure_step_times(params: Params, data_dir: str | Path, teacher_path: str | Path, method: str,
                       iters: int = 20, warmup: int = 3, device: torch.device = torch.device("cpu"),
                       pretrained_dir: Optional[str | Path] = None) -> dict:
    """Median seconds of the parts for ``method`` (params' hyper-parameters), see module docstring.
    The student starts as training starts it (``pretrained_dir``: the pretrain stage's output), so a
    frozen stem and first stage are left out of both steps alike."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    params = params.model_copy(update={"distill": params.distill.model_copy(update={"method": method})})
    schedule = params.train_student
    seed = params.stage_seed("student")
    index = open_split(data_dir, "train", params.data.min_box_size)
    spec = make_spec(params.model.family, params.student.backbone, index.num_classes, params.detector_config("student"))
    seed_everything(seed)
    student = build_detector(spec, params.student.weights, backbone_start(params, "student", pretrained_dir))
    baseline = _Trainee(copy.deepcopy(student), schedule, device)
    distill_module, _ = build_distillation_model(params, student, spec, index, teacher_path)
    distilled = _Trainee(distill_module, schedule, device)

    sampler = EpochSampler(len(index.images), seed, shuffle=True, hflip_p=schedule.hflip)
    loader = make_loader(DetectionDataset(index), schedule.batch_size, 0, sampler)
    batches = []
    for images, targets in loader:
        batches.append(to_device(images, targets, device))
        if len(batches) == min(iters + warmup, 8):
            break

    times = {"baseline_step": [], "teacher_forward": [], "distill_step": [], "teacher_on_request": []}
    for r in range(warmup + iters):
        images, targets = batches[r % len(batches)]
        shared, _ = transform_batch(distill_module.student, images, targets)
        before = distill_module.teacher_seconds
        sample = {
            "baseline_step": _timed(lambda: baseline.step(images, targets), device),
            "teacher_forward": _timed(lambda: distill_module.teacher_forward(shared), device),
            "distill_step": _timed(lambda: distilled.step(images, targets), device),
        }
        sample["teacher_on_request"] = distill_module.teacher_seconds - before
        if r >= warmup:
            for key, value in sample.items():
                times[key].append(value)
    result = {key: statistics.median(values) for key, values in times.items()}
    # per batch, so a slow phase of the machine or a batch with more objects cancels out of the difference
    added = [d - b - t - q for d, b, t, q in zip(times["distill_step"], times["baseline_step"],
                                                 times["teacher_forward"], times["teacher_on_request"])]
    result["overhead"] = statistics.median(added)
    result["overhead_iqr"] = _quartiles(added)
    result["overhead_share_of_baseline"] = result["overhead"] / result["baseline_step"]
    result.update(method=method, family=params.model.family, iters=iters, warmup=warmup, device=str(device),
                  threads=torch.get_num_threads())
    return result


def experiment_teacher(name: str, repo: Path = Path(".")) -> Optional[Path]:
    """The cached teacher checkpoint of DVC experiment ``name`` (newest of that name, any baseline
    commit), or None when no experiment has that name."""
    import subprocess

    from detkd.compare import teacher_checkpoint

    refs = subprocess.run(["git", "for-each-ref", "refs/exps", "--sort=-committerdate",
                           "--format=%(refname) %(objectname)"], cwd=repo, text=True, capture_output=True).stdout
    for line in refs.splitlines():
        ref, rev = line.split()
        if ref.rsplit("/", 1)[-1] == name and not ref.startswith("refs/exps/apply"):
            return teacher_checkpoint(rev, repo)
    return None


def format_row(r: dict) -> str:
    """One line of the breakdown, in milliseconds."""
    ms = lambda x: f"{x * 1e3:.0f}"  # noqa: E731
    low, high = r["overhead_iqr"]
    return (f"{r['family']:<10} {r['method']:<7} {ms(r['baseline_step']):>9} {ms(r['teacher_forward']):>8} "
            f"{ms(r['teacher_on_request']):>7} {ms(r['distill_step']):>8} {ms(r['overhead']):>6} "
            f"{r['overhead_share_of_baseline']:>+6.0%}  {ms(low)}..{ms(high)}")


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    import json

    from detkd.config import load_params
    from detkd.distill import METHODS
    from detkd.errors import DetkdError

    parser = argparse.ArgumentParser(prog="python -m detkd.step_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher.pt",
                        help="teacher checkpoint, or the name of a DVC experiment that trained one "
                             "(e.g. cmp-retina-teacher from make compare)")
    parser.add_argument("--family", default=None, help="model.family (default: params.yaml's)")
    parser.add_argument("--methods", nargs="+", default=["fitnet", "dsig", "drkd", "gid", "defeat", "mar"])
    parser.add_argument("--iters", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--pretrained", default="models/pretrained", help="the pretrain stage's output")
    parser.add_argument("--json", default=None, help="also write the breakdowns to this JSON file")
    args = parser.parse_args(argv)

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise DetkdError(f"--methods: unknown {unknown}; choose from {', '.join(sorted(METHODS))}")
    teacher = Path(args.teacher)
    if not teacher.is_file():
        teacher = experiment_teacher(args.teacher)
        if teacher is None:
            raise DetkdError(f"--teacher: {args.teacher} is neither a file nor a DVC experiment name "
                             "(dvc exp list -A lists them; dvc repro train_teacher writes models/teacher.pt)")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"model": {"family": args.family}} if args.family else None
    params = load_params(args.params, overrides)
    pretrained = args.pretrained if Path(args.pretrained).is_dir() else None
    print(f"{'family':<10} {'method':<7} {'baseline':>9} {'teacher':>8} {'on-req':>7} {'distill':>8} {'added':>6} "
          f"{'share':>6}  added IQR   (ms per step, median of {args.iters}; {torch.get_num_threads()} threads)")
    rows = []
    for method in args.methods:
        row = measure_step_times(params, args.data, teacher, method, iters=args.iters, warmup=args.warmup,
                                 pretrained_dir=pretrained)
        rows.append(row)
        print(format_row(row), flush=True)
    if args.json:
        from detkd.io import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    from detkd.cli import run_main

    run_main(main)
