"""Backbone pretraining on generated object images: the stand-in for ImageNet weights on the default data.

Real users start both detectors from ImageNet backbones; nothing can be downloaded here, and from scratch a
RetinaNet on the default data stays class-agnostic for hundreds of iterations (its dense classifier sees
a few positive anchors per object, where Faster R-CNN's RoI head sees 64 sampled RoIs per image). So the
``pretrain`` stage trains each role's backbone as an image classifier first, the way ImageNet weights are
made, on images that no other split contains:

- each image is ``pretrain.image_size`` px with exactly one object of the data's classes on the default
  data's background and clutter, drawn by ``detkd.data.synthetic.render_image`` from its own generator
  stream (split ``pretrain``), so it is disjoint from train, dev and val by construction;
- the label is the object's class; a torchvision classification network of the role's backbone is trained
  with cross-entropy (AdamW, one-cycle schedule) for ``pretrain.iterations`` steps;
- its state dict (classifier included) is what ``teacher/student.backbone_weights`` would otherwise be:
  the detector builder loads everything but the classifier.

Contract: ``pretrain_backbone(backbone, cfg, data_cfg, seed)`` returns ``(state_dict, report)``; the same
arguments on the same machine and thread count give the same weights. ``pretrained_backbone_path`` tells
training which file to start a role from. Only the synthetic source has a generator, so COCO data is
refused: give ImageNet weights as ``backbone_weights`` there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detkd.cli import seed_everything
from detkd.config import Params, PretrainConfig, SyntheticConfig
from detkd.data.synthetic import render_image
from detkd.errors import ConfigError, TrainingDivergedError

MANIFEST = "pretrain.json"
HELD_OUT_IMAGES = 512  # images after the training stream, scored once at the end


def crop_config(data_cfg: SyntheticConfig, image_size: int) -> SyntheticConfig:
    """The default data's generator at ``image_size`` px with exactly one object per image (object sizes
    capped at 3/4 of the side, clutter scaled with the image area)."""
    scale = (image_size / data_cfg.image_size) ** 2
    return data_cfg.model_copy(update={
        "image_size": image_size, "max_objects": 1, "empty_fraction": 0.0,
        "max_object_size": min(data_cfg.max_object_size, 0.75 * image_size),
        "min_object_size": min(data_cfg.min_object_size, 0.75 * image_size),
        "clutter": max(1, round(data_cfg.clutter * scale)) if data_cfg.clutter else 0,
    })


class ObjectImages(Dataset):
    """Image ``i`` is ``(image [3,S,S] normalised, class index)``, a pure function of ``(seed, i)``."""

    def __init__(self, cfg: SyntheticConfig, seed: int, length: int, offset: int = 0,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.cfg, self.seed, self.length, self.offset = cfg, seed, length, offset
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        pixels, annotations = render_image(self.cfg, self.seed, "pretrain", self.offset + i)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        return (image - self.mean) / self.std, annotations[0]["label"]


def classifier(backbone: str, num_classes: int) -> nn.Module:
    """torchvision's classification network ``backbone`` with a ``num_classes`` head, random weights."""
    import torchvision.models as tvm

    from detkd.config import BACKBONES

    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone '{backbone}'; choose one of: {', '.join(BACKBONES)}")
    return getattr(tvm, backbone)(weights=None, num_classes=num_classes)


def pretrain_backbone(backbone: str, cfg: PretrainConfig, data_cfg: SyntheticConfig, seed: int,
                      description: str = "pretrain") -> tuple[dict, dict]:
    """Train ``backbone`` as a classifier of one-object images; returns its state dict and a report
    (iterations, seconds, final training loss, accuracy on ``HELD_OUT_IMAGES`` later images)."""
    crops = crop_config(data_cfg, cfg.image_size)
    seed_everything(seed)
    net = classifier(backbone, crops.num_classes)
    total = cfg.iterations * cfg.batch_size
    loader = DataLoader(ObjectImages(crops, seed, total), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.workers, persistent_workers=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    net.train()
    start, losses = time.perf_counter(), []
    bar = tqdm(loader, total=cfg.iterations, desc=f"{description} {backbone}", dynamic_ncols=True, mininterval=1.0)
    for images, labels in bar:
        loss = F.cross_entropy(net(images), labels)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"pretrain: the loss of {backbone} became {loss.item()}; lower pretrain.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    seconds = time.perf_counter() - start
    report = {"backbone": backbone, "iterations": cfg.iterations, "seconds": round(seconds, 1),
              "final_loss": round(float(np.mean(losses[-20:])), 4),
              "held_out_accuracy": round(held_out_accuracy(net, crops, seed, total), 4)}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, report


@torch.no_grad()
def held_out_accuracy(net: nn.Module, crops: SyntheticConfig, seed: int, offset: int) -> float:
    """Top-1 accuracy on ``HELD_OUT_IMAGES`` images after the ``offset`` used in training."""
    net.eval()
    loader = DataLoader(ObjectImages(crops, seed, HELD_OUT_IMAGES, offset), batch_size=128)
    correct = sum((net(images).argmax(1) == labels).sum().item() for images, labels in loader)
    return correct / HELD_OUT_IMAGES


def check_pretrain_source(params: Params) -> None:
    """Pretraining draws images from the synthetic generator: refuse it for other data, saying what to do."""
    if params.pretrain.enabled and params.data.source != "synthetic":
        raise ConfigError(
            f"pretrain.enabled: the pretrain stage generates synthetic shapes and fits only data.source "
            f"'synthetic' (got '{params.data.source}'); set pretrain.enabled: false and give ImageNet weights "
            f"as teacher.backbone_weights / student.backbone_weights")


def roles_to_pretrain(params: Params) -> list[str]:
    """Roles the stage pretrains: none when disabled; otherwise each role without its own backbone_weights."""
    if not params.pretrain.enabled:
        return []
    return [role for role in ("teacher", "student") if getattr(params, role).backbone_weights is None]


def backbone_start(params: Params, role: str, pretrained_dir: Optional[str | Path]) -> Optional[str]:
    """The backbone file ``role`` starts from: its own ``backbone_weights`` when set, else the pretrain
    stage's file for it in ``pretrained_dir`` (if that stage made one), else None (from scratch)."""
    network = getattr(params, role)
    return network.backbone_weights or pretrained_backbone_path(pretrained_dir, role, network.backbone)


def pretrained_backbone_path(pretrained_dir: Optional[str | Path], role: str, backbone: str) -> Optional[str]:
    """The backbone file the ``pretrain`` stage wrote for ``role``, or None when it pretrained none for it.
    A file made for another backbone is refused (the stage is stale: run ``dvc repro``)."""
    if pretrained_dir is None:
        return None
    manifest_path = Path(pretrained_dir) / MANIFEST
    if not manifest_path.exists():
        raise ConfigError(f"{manifest_path}: missing; run the pretrain stage (dvc repro pretrain)")
    entry = json.loads(manifest_path.read_text()).get("roles", {}).get(role)
    if entry is None:
        return None
    if entry.get("backbone") != backbone:
        raise ConfigError(f"{manifest_path}: the {role} backbone was pretrained as '{entry.get('backbone')}', "
                          f"params say '{backbone}'; run dvc repro pretrain")
    return str(Path(pretrained_dir) / entry["file"])
