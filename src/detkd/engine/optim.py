"""Optimiser and learning-rate schedule from a ``TrainConfig``.

The schedule is a function of the iteration only (``lr_factor``), so resuming at iteration ``k`` gives
exactly the rate an uninterrupted run would have had.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from detkd.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; weight decay is not applied to norm layers and biases (1-d params)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(iteration: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``iteration`` (0-based) of ``total``: linear warm-up, then the schedule."""
    if cfg.warmup_iters and iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    progress = min(iteration / max(total, 1), 1.0)
    if cfg.schedule == "cosine":
        main = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "step":
        main = 0.1 ** sum(progress >= m for m in cfg.step_milestones)
    else:
        main = 1.0
    return warm * main


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, cfg))
