"""One training loop for the teacher, the baseline student and (later) distillation.

Contract: ``train(module, dataset, cfg, ...)`` optimises ``module``, whose ``forward(images, targets)``
returns a dict of named scalar losses (a torchvision detector in train mode does exactly this; a
distillation wrapper returns ``task/*`` plus ``distill/*`` terms). The loop sums the dict, logs every
term, and knows nothing about what the terms mean.

It provides: SGD/AdamW, warm-up + schedule (a pure function of the iteration, see ``optim``), gradient
clipping, AMP on CUDA, deterministic data order (``EpochSampler``), a progress bar with loss and ETA,
periodic resumable checkpoints (``state_path``), and DistributedDataParallel under ``torchrun`` where
only rank 0 writes. A non-finite loss raises ``TrainingDivergedError``; the last periodic checkpoint,
written only from finite steps, is kept.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from detkd.config import TrainConfig
from detkd.data.dataset import DetectionDataset, EpochSampler, make_loader
from detkd.engine.checkpoint import load_file
from detkd.engine.distributed import DistInfo, all_reduce_mean
from detkd.engine.optim import build_optimizer, build_scheduler
from detkd.errors import CheckpointError, OutputWriteError, TrainingDivergedError
from detkd.io import atomic_torch_save

LogFn = Callable[[int, dict], None]


@dataclass
class TrainResult:
    iterations: int
    seconds: float  # wall time of this process's training (excludes resumed parts)
    seconds_per_iter: float
    peak_memory_mb: float
    history: list[dict] = field(default_factory=list)  # rows logged every ``log_every`` iterations
    resumed_from: int = 0


def _prefixed(losses: dict) -> dict:
    return {(k if "/" in k else f"task/{k}"): v for k, v in losses.items()}


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def loss_parts(row: dict) -> dict:
    """``task_loss`` and ``distill_loss``, the sums of a logged row's ``task/*`` and ``distill/*`` terms, when
    it has distillation terms (the detector's own loss is then comparable with a plain run's ``loss``)."""
    if not any(k.startswith("distill/") for k in row):
        return {}
    return {"task_loss": sum(v for k, v in row.items() if k.startswith("task/")),
            "distill_loss": sum(v for k, v in row.items() if k.startswith("distill/"))}


def forward_losses(model: nn.Module, images, targets, use_amp: bool) -> tuple[dict, torch.Tensor]:
    """The forward half of a training step: named loss terms (``task/*``, ``distill/*``) and their sum.
    ``use_amp`` is the caller's decision (the trainer enables it on CUDA only)."""
    with torch.autocast(images[0].device.type, enabled=use_amp):
        losses = _prefixed(model(images, targets))
    return losses, sum(losses.values())


def apply_gradients(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    trainable: list, grad_clip: Optional[float]) -> None:
    """The backward half: zero grads, (scaled) backward, optional clipping, optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _load_resumable_state(state_path: Path, is_main: bool) -> Optional[dict]:
    """The periodic state at ``state_path``, or None. Temporary files a killed write left beside it are
    removed; a state that cannot be read (cut short, not a detkd state) is moved aside to
    ``<name>.corrupt`` with a one-line warning, so the stage starts afresh instead of failing every rerun."""
    if is_main:
        for stale in state_path.parent.glob(f".{state_path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if not state_path.is_file():
        return None
    try:
        state = load_file(state_path)
        if not isinstance(state, dict) or not {"module", "optimizer", "iteration", "rng"} <= state.keys():
            raise CheckpointError(f"{state_path}: not a detkd training state")
    except CheckpointError as exc:
        if is_main:
            aside = state_path.with_name(state_path.name + ".corrupt")
            os.replace(state_path, aside)
            print(f"warning: {exc}; moved it to {aside} and starting afresh", file=sys.stderr)
        return None
    return state


def train(
    module: nn.Module,
    dataset: DetectionDataset,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    state_path: Optional[Path] = None,
    fingerprint: str = "",
    on_log: Optional[LogFn] = None,
    description: str = "train",
) -> TrainResult:
    """Train ``module`` in place for ``cfg.epochs`` epochs over ``dataset``; see the module docstring."""
    module.to(device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg)
    sampler = EpochSampler(len(dataset), seed, shuffle=True, hflip_p=cfg.hflip, rank=dist_info.rank, world=dist_info.world)
    iters_per_epoch = math.ceil(sampler.per_rank / cfg.batch_size)
    total = cfg.epochs * iters_per_epoch
    scheduler = build_scheduler(optimizer, total, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start, history, resume_rng = 0, [], None
    state = _load_resumable_state(state_path, dist_info.is_main) if state_path is not None else None
    if state is not None:
        if state.get("fingerprint") == fingerprint and state.get("total") == total:
            module.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start, history = int(state["iteration"]), list(state["history"])
            resume_rng = state["rng"]  # restored where the interrupted run was: see the epoch loop
            if dist_info.is_main:
                print(f"{description}: resuming from {state_path} at iteration {start}/{total}")
        elif dist_info.is_main:
            print(f"{description}: ignoring {state_path} (made with other settings); starting afresh")

    model = module
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    model.train()

    state_write_failed = False

    def save_state(iteration: int) -> None:
        """The periodic state is optional: a write the filesystem refuses warns once and training goes on."""
        nonlocal state_write_failed
        if state_path is None or not dist_info.is_main:
            return
        try:
            _write_state(iteration)
        except OutputWriteError as exc:
            if not state_write_failed:
                tqdm.write(f"warning: periodic training state not saved: {exc}; training goes on, but an "
                           "interruption from here restarts from the last state that was saved", file=sys.stderr)
            state_write_failed = True

    def _write_state(iteration: int) -> None:
        atomic_torch_save(
            state_path,
            {
                "module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": iteration,
                "total": total,
                "history": history,
                "fingerprint": fingerprint,
                "rng": torch.get_rng_state(),
            },
        )

    bar = tqdm(total=total, initial=start, desc=description, disable=not dist_info.is_main, dynamic_ncols=True,
               mininterval=1.0)
    iteration, t0, running = start, time.perf_counter(), {}
    for epoch in range(start // iters_per_epoch, cfg.epochs):
        skip = (iteration - epoch * iters_per_epoch) * cfg.batch_size
        sampler.set_epoch(epoch, skip=skip)
        loader = make_loader(dataset, cfg.batch_size, cfg.workers, sampler)
        # Starting an epoch's DataLoader iterator draws its base seed from torch's global generator, the one
        # the detectors' RoI/anchor samplers use. A state saved at an epoch's end holds the generator before
        # that draw; one saved mid-epoch holds it after (the uninterrupted run drew at the epoch's start).
        # Restoring on the matching side of iter() continues the uninterrupted run's stream exactly.
        if resume_rng is not None and skip == 0:
            torch.set_rng_state(resume_rng)
            resume_rng = None
        batches = iter(loader)
        if resume_rng is not None:
            torch.set_rng_state(resume_rng)
            resume_rng = None
        for images, targets in batches:
            images, targets = to_device(images, targets, device)
            losses, loss = forward_losses(model, images, targets, use_amp)
            if not torch.isfinite(loss):
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                kept = f"the last good checkpoint is {state_path}" if state_path and state_path.is_file() else "no checkpoint was written yet"
                raise TrainingDivergedError(
                    f"{description}: loss became {loss.item()} at iteration {iteration} ({terms}); {kept}. "
                    "Lower the learning rate or enable grad_clip in params.yaml."
                )
            apply_gradients(loss, optimizer, scaler, trainable, cfg.grad_clip)
            scheduler.step()
            iteration += 1

            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            running["loss"] = running.get("loss", 0.0) + float(loss.detach())
            running["_n"] = running.get("_n", 0) + 1
            if iteration % cfg.log_every == 0 or iteration == total:
                n = running.pop("_n")
                row = {k: float(all_reduce_mean(torch.tensor(v / n, device=device), dist_info)) for k, v in running.items()}
                row.update(loss_parts(row), step=iteration, epoch=epoch, lr=optimizer.param_groups[0]["lr"])
                history.append(row)
                running = {}
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
                if on_log is not None and dist_info.is_main:
                    on_log(iteration, row)
            bar.update(1)
            if iteration % cfg.checkpoint_every == 0 and iteration < total:
                save_state(iteration)
    bar.close()
    seconds = time.perf_counter() - t0
    done = iteration - start
    return TrainResult(
        iterations=iteration,
        seconds=seconds,
        seconds_per_iter=seconds / max(done, 1),
        peak_memory_mb=_peak_memory_mb(device),
        history=history,
        resumed_from=start,
    )
