"""Detector builders: torchvision Faster R-CNN + FPN and RetinaNet + FPN on ResNet or MobileNetV3.

Contract: ``build_detector(spec)`` returns a torchvision detector (train mode: dict of named losses;
eval mode: list of ``{boxes, labels, scores}``) built with ``weights=None``: nothing is downloaded.
Whatever the backbone, a family always exposes the same pyramid so teacher and student features line
up level by level (what distillation needs):

- ``fasterrcnn``: FPN levels '0'..'3' = P2..P5 (strides 4..32) + 'pool' = P6 (stride 64);
- ``retinanet``:  ``model.retinanet_levels`` "p2-p6" (default): the same pyramid as Faster R-CNN, '0'..'3' =
                  P2..P5 + 'pool' (P6); "p3-p7" (torchvision's, for ~800 px inputs): '0'..'2' = P3..P5 (strides
                  8..32) + 'p6', 'p7' (strides 64, 128) from strided convs.

Labels are contiguous 1..K with 0 reserved for background, so both families get ``K + 1`` classes.

MobileNetV3's BatchNorm layers get momentum 0.1 (as ResNet's) instead of torchvision's 0.01: the latter is
tuned for hundreds of ImageNet epochs, and after a short from-scratch schedule the running statistics
still sit near their initial values, so the eval-mode network is far worse than the trained one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torchvision.models import (mobilenet_v3_large, mobilenet_v3_small, regnet_x_400mf, regnet_x_800mf, resnet18,
                                resnet34, resnet50, resnet101)
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detkd.config import BACKBONES, FAMILIES, DetectorConfig
from detkd.engine.checkpoint import load_state_dict_file
from detkd.errors import CheckpointError, ConfigError

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101}
_MOBILENETS = {"mobilenet_v3_large": mobilenet_v3_large, "mobilenet_v3_small": mobilenet_v3_small}
_REGNETS = {"regnet_x_400mf": regnet_x_400mf, "regnet_x_800mf": regnet_x_800mf}
# Indices into torchvision's MobileNetV3 stage list (stem, each down-sampling block, last conv) whose
# outputs have strides 4, 8, 16, 32: the same for the large and the small network.
_MOBILENET_STAGES = {4: 1, 8: 2, 16: 3, 32: 5}
# Backbone strides under the FPN per pyramid (the fifth level is added on top of them).
PYRAMID_STRIDES = {"p2-p6": (4, 8, 16, 32), "p3-p7": (8, 16, 32)}
# The maps RoIs are pooled from (the Faster R-CNN box head, DSIG/GID node features): every FPN level but
# the max-pooled P6, which only subsamples P5.
ROI_LEVELS = {"p2-p6": ["0", "1", "2", "3"], "p3-p7": ["0", "1", "2", "p6", "p7"]}
MOBILENET_BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to rebuild a detector; stored in every checkpoint's metadata."""

    family: str
    backbone: str
    num_classes: int  # foreground classes K
    model: dict = field(default_factory=dict)  # DetectorConfig as a plain dict (shared + the role's keys)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorSpec":
        return cls(data["family"], data["backbone"], int(data["num_classes"]), dict(data["model"]))


def make_spec(family: str, backbone: str, num_classes: int, model_cfg: DetectorConfig) -> DetectorSpec:
    """``model_cfg`` is one role's full architecture (``Params.detector_config(role)``)."""
    if not isinstance(model_cfg, DetectorConfig):
        raise TypeError(f"make_spec needs a DetectorConfig (Params.detector_config(role)), got {type(model_cfg).__name__}")
    if family not in FAMILIES:
        raise ConfigError(f"unknown detector family '{family}'; choose one of: {', '.join(FAMILIES)}")
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone '{backbone}'; choose one of: {', '.join(BACKBONES)}")
    return DetectorSpec(family, backbone, num_classes, model_cfg.model_dump())


def pyramid(family: str, cfg: DetectorConfig) -> str:
    """The pyramid a detector uses: "p2-p6" for Faster R-CNN, ``cfg.retinanet_levels`` for RetinaNet."""
    return "p2-p6" if family == "fasterrcnn" else cfg.retinanet_levels


def _body_with_fpn(levels: str, backbone: str, fpn_channels: int, backbone_weights: Optional[str],
                   fpn_norm: bool = False, freeze_pretrained: bool = False) -> BackboneWithFPN:
    """The backbone stages of pyramid ``levels`` under an FPN of ``fpn_channels``; with ``fpn_norm`` every
    FPN conv is followed by BatchNorm (torchvision's v2 detectors do the same). With ``backbone_weights``
    and ``freeze_pretrained`` the backbone is frozen as ``freeze_pretrained_backbone`` says."""
    strides = PYRAMID_STRIDES[levels]
    extra = LastLevelMaxPool() if levels == "p2-p6" else LastLevelP6P7(fpn_channels, fpn_channels)
    norm = nn.BatchNorm2d if fpn_norm else None
    if backbone in _RESNETS:
        body = _RESNETS[backbone](weights=None)
        _load_backbone_weights(body, backbone_weights)
        layer_of_stride = {4: 1, 8: 2, 16: 3, 32: 4}
        return_layers = {f"layer{layer_of_stride[s]}": str(k) for k, s in enumerate(strides)}
        in_channels = [_resnet_stage_channels(body, layer_of_stride[s]) for s in strides]
        if backbone_weights and freeze_pretrained:
            freeze_pretrained_backbone(body, [body.conv1, body.bn1, body.layer1])
        return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra, norm_layer=norm)
    if backbone in _REGNETS:  # stem (stride 2), then block1..block4 at strides 4, 8, 16, 32
        net = _REGNETS[backbone](weights=None)
        _load_backbone_weights(net, backbone_weights)
        trunk = net.trunk_output
        body = nn.Sequential(OrderedDict([("stem", net.stem), *trunk.named_children()]))
        block_of_stride = {4: "block1", 8: "block2", 16: "block3", 32: "block4"}
        return_layers = {block_of_stride[s]: str(k) for k, s in enumerate(strides)}
        in_channels = [_last_out_channels(getattr(trunk, block_of_stride[s])) for s in strides]
        if backbone_weights and freeze_pretrained:
            freeze_pretrained_backbone(body, [body.stem, body.block1])
        return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra, norm_layer=norm)
    body = _MOBILENETS[backbone](weights=None)
    for module in body.modules():  # torchvision's 0.01 suits 600 ImageNet epochs; see the module docstring
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = MOBILENET_BN_MOMENTUM
    _load_backbone_weights(body, backbone_weights)
    features = body.features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    chosen = [stage_indices[_MOBILENET_STAGES[s]] for s in strides]
    return_layers = {str(idx): str(k) for k, idx in enumerate(chosen)}
    in_channels = [features[idx].out_channels for idx in chosen]
    if backbone_weights and freeze_pretrained:  # the stem and the blocks up to the stride-4 output
        freeze_pretrained_backbone(features, list(features)[: stage_indices[_MOBILENET_STAGES[4]] + 1])
    return BackboneWithFPN(features, return_layers, in_channels, fpn_channels, extra_blocks=extra, norm_layer=norm)


class FrozenBatchNorm(nn.BatchNorm2d):
    """BatchNorm that always normalises with its stored statistics and keeps them (torchvision's
    ``FrozenBatchNorm2d``), with ``nn.BatchNorm2d``'s state-dict layout and export graph, so checkpoints and
    ONNX files do not depend on whether a network was trained frozen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def freeze_pretrained_backbone(body: nn.Module, first_stages: list[nn.Module]) -> None:
    """torchvision's fine-tuning of a pretrained backbone: every BatchNorm keeps its statistics and affine
    parameters (batches of a few images estimate them worse than the pretraining did), and the stem and
    first stage (``first_stages``) are not trained. Without it the detection losses, which at first ask only
    where objects are, wash the class information out of the pretrained features before the (dense)
    classifier learns to read it (see README, "One-stage detectors")."""
    for module in body.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FrozenBatchNorm  # same parameters and buffers; only forward changes
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)
    for stage in first_stages:
        for param in stage.parameters():
            param.requires_grad_(False)


def _last_out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _resnet_stage_channels(body: nn.Module, layer: int) -> int:
    block = getattr(body, f"layer{layer}")[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def _load_backbone_weights(body: nn.Module, path: Optional[str]) -> None:
    """Load a classification checkpoint into the backbone; its classifier head keys are ignored."""
    if not path:
        return
    state = load_state_dict_file(path)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit the backbone (missing keys: {missing[:3]}, unexpected keys: {unexpected[:3]})"
        )


def spec_config(spec: DetectorSpec) -> DetectorConfig:
    """The architecture a spec describes. Specs from before the per-role keys hold ``family`` in the dict
    and lack the newer keys (they take the defaults, which are what those detectors were built with, except
    RetinaNet's pyramid: one without ``retinanet_levels`` was built on P3-P7)."""
    model = {k: v for k, v in spec.model.items() if k != "family"}
    if spec.family == "retinanet":
        model.setdefault("retinanet_levels", "p3-p7")
    try:
        return DetectorConfig.model_validate(model)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CheckpointError(f"detector spec: {'.'.join(map(str, err['loc']))}: {err['msg']} "
                              f"(got {err.get('input')!r})") from None


def build_detector(
    spec: DetectorSpec, weights: Optional[str] = None, backbone_weights: Optional[str] = None
) -> nn.Module:
    """Build the detector described by ``spec``; optionally load local detector or backbone weights."""
    cfg = spec_config(spec)
    body = _body_with_fpn(pyramid(spec.family, cfg), spec.backbone, cfg.fpn_channels, backbone_weights, cfg.fpn_norm,
                          cfg.freeze_pretrained)
    num_classes = spec.num_classes + 1
    common = dict(
        min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std)
    )
    ratios = tuple(cfg.aspect_ratios)
    if spec.family == "fasterrcnn":
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (ratios,) * 5)
        model = FasterRCNN(
            body,
            num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=cfg.roi_canonical_size),
            box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size),
            box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes),
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_detections_per_img=cfg.detections_per_image,
            box_score_thresh=cfg.score_threshold,
            **common,
        )
    else:
        octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        anchors = AnchorGenerator(tuple(tuple(s * o for o in octaves) for s in cfg.anchor_sizes), (ratios,) * 5)
        head = RetinaNetHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, math.gcd(16, cfg.fpn_channels)))
        _set_tower_depth(head, cfg.head_depth)
        model = RetinaNet(
            body,
            num_classes,
            anchor_generator=anchors,
            head=head,
            detections_per_img=cfg.detections_per_image,
            topk_candidates=cfg.topk_candidates,
            score_thresh=cfg.score_threshold,
            **common,
        )
    model.roi_canonical_size = cfg.roi_canonical_size  # what distillation's own RoI pooling uses too
    model.roi_levels = ROI_LEVELS[pyramid(spec.family, cfg)]
    if weights:
        state = load_state_dict_file(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights}: does not fit a {spec.family}/{spec.backbone} detector with "
                                  f"{spec.num_classes} classes: {str(exc).splitlines()[0]}") from None
    return model


def _set_tower_depth(head: RetinaNetHead, depth: int) -> None:
    """Keep the first ``depth`` conv-norm-ReLU blocks of RetinaNet's classification and box towers
    (torchvision builds 4; every block maps width -> width, so any prefix is a valid tower)."""
    for tower in (head.classification_head, head.regression_head):
        if depth > len(tower.conv):
            raise ConfigError(f"retinanet.head_depth {depth}: at most {len(tower.conv)} convs per tower")
        tower.conv = nn.Sequential(*list(tower.conv)[:depth])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)) / 2**20
