"""DSIG: Deep Structured Instance Graphs for distilling object detectors (Chen et al., ICCV 2021), after
the official code (dvlab-research/Dsig).

Two-stage (Faster R-CNN): nodes are the RoIAlign features of the student's *sampled* RoIs, pooled from
each network's own FPN on the same boxes. Per image i (fg = label > 0, bg = label == 0 in torchvision):
    L_fg   = sum_i MSE_mean(V_S_fg, V_T_fg)                                  weight ``w_fg`` (0.5)
    L_bg   = sum_i (alpha * n_fg / n_bg) * MSE_mean(V_S_bg, V_T_bg)          weight ``w_bg`` (0.5), alpha 7.5
    L_edge = sum_i 0.5 * MSE_mean(E_T, E_S), E = cosine-similarity matrix of the graph's nodes
             (fg RoIs + background RoIs the teacher finds confusing: CE(teacher logits, bg) >= ``bg_ce_threshold``
             (0.6); the diagonal is included)                                weight ``w_edge`` (2.0 for R18<-R50)
  plus the extras of the R18<-R50 configs: RoI-logit KL at T=1 with PyTorch's mean over R x (K+1)
  (``w_logits`` 3.0), L1 between class-specific deltas of fg RoIs on their GT-class columns divided by the
  number of sampled RoIs (``w_deltas`` 1.0), and full-map FPN MSE summed over levels (``w_fpn`` 0.5).
One-stage (RetinaNet): nodes are the student's own detections of this step (top ``topk`` (anchor, class)
pairs with score > 0 per level, class-wise NMS at 0.5, at most ``max_nodes`` per image), pooled from both
FPNs with the multi-scale RoIAlign; node and edge terms without fg/bg split (``w_nodes`` 0.5, ``w_edge`` 1.0),
FPN MSE (0.5), and the head KD: softmax KL over the class logits on non-ignored anchors (``w_logits`` 1.0)
and L1 on the deltas of positive anchors divided by their number (``w_deltas`` 1.0).

Adapters (student side, trained with the student, never exported), present only when the FPN widths
differ (identity otherwise, as in the paper): ``roi_adapter``, a 1x1 conv on the student's pooled node
features; ``fpn_adapters``, one 1x1 conv per level for the FPN term. The RoI logits and deltas need none:
both heads predict the same K+1 classes whatever their representation sizes.

Deviations (tested or stated): node and edge terms are summed over images as in the code, so their scale
grows with images per batch (the code used 2 per GPU); RoIAlign is torchvision's (aligned=False; the
one-stage nodes are pooled by ``detkd.distill.roi_pool``'s gather, equal to torchvision's and faster on CPU)
rather than detectron2's ROIAlignV2; with differing FPN widths a 1x1 student adapter maps pooled features
(the paper's students all had 256-channel FPNs and no adapter); a graph with no nodes contributes 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from detkd.distill.base import (POOL_LEVELS, DistillInputs, DistillMethod, first_k_batched_nms, fpn_mse,
                                optional_adapter, optional_roi_adapter, register, zero_if_empty)
from detkd.distill.roi_pool import GatherMultiScaleRoIAlign


def edge_loss(student_nodes: Tensor, teacher_nodes: Tensor) -> Tensor:
    """0.5 * MSE_mean between the cosine-similarity matrices of the flattened nodes [m, D] (fp32)."""
    a_s = F.normalize(student_nodes.flatten(1).float(), dim=1)
    a_t = F.normalize(teacher_nodes.flatten(1).float(), dim=1)
    return 0.5 * F.mse_loss(a_s @ a_s.T, a_t @ a_t.T)


def mine_background(teacher_bg_logits: Tensor, threshold: float) -> Tensor:
    """Background RoIs the teacher finds confusing: CE w.r.t. the background label 0 >= threshold."""
    if teacher_bg_logits.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=teacher_bg_logits.device)
    target = torch.zeros(teacher_bg_logits.shape[0], dtype=torch.long, device=teacher_bg_logits.device)
    return F.cross_entropy(teacher_bg_logits.float(), target, reduction="none") >= threshold


def graph_losses(s_feats, t_feats, labels, t_logits, alpha: float, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(L_fg, L_bg, L_edge) summed over images; inputs are per-image lists ([R_i, ...], labels [R_i]).
    Each node's squared error is reduced once and the graph's nodes are gathered with one index, rather
    than masking the features for every term: the same sums (every RoI has the same number of elements,
    so the mean over a set of RoIs is the mean of their per-RoI means), with one backward scatter each."""
    zero = zero_if_empty(s_feats[0]) if s_feats else torch.zeros(())
    l_fg, l_bg, l_edge = zero, zero, zero
    for s, t, lab, logit in zip(s_feats, t_feats, labels, t_logits):
        fg, bg = torch.nonzero(lab > 0).squeeze(1), torch.nonzero(lab == 0).squeeze(1)
        n_fg, n_bg = fg.numel(), bg.numel()
        per_node = (s - t).pow(2).flatten(1).mean(1)  # [R_i]
        if n_fg:
            l_fg = l_fg + per_node[fg].mean()
        nodes = fg
        if n_bg:
            l_bg = l_bg + alpha * n_fg / n_bg * per_node[bg].mean()
            nodes = torch.cat([fg, bg[mine_background(logit[bg], threshold)]])
        if nodes.numel():
            l_edge = l_edge + edge_loss(s[nodes], t[nodes])
    return l_fg, l_bg, l_edge


def kl_mean_over_elements(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(t) || softmax(s)) summed, then divided by the number of *elements* R x C: the code's
    ``F.kl_div(..., reduction="mean")``, spelled out because PyTorch will change what "mean" means."""
    log_s = F.log_softmax(student_logits.float(), dim=1)
    log_t = F.log_softmax(teacher_logits.float(), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum() / max(student_logits.numel(), 1)


@register
class DSIG(DistillMethod):
    name = "dsig"
    weight_keys = ("w_fg", "w_bg", "w_nodes", "w_edge", "w_logits", "w_deltas", "w_fpn")
    # the official one-stage configs (retinanet_kd) weigh the edges and the head-logit KD 1.0
    family_defaults = {"retinanet": {"w_edge": 1.0, "w_logits": 1.0}}
    unused_weights = {"fasterrcnn": ("w_nodes",), "retinanet": ("w_fg", "w_bg")}

    def __init__(self, family: str, student_channels: int, teacher_channels: int, w_fg: float = 0.5,
                 w_bg: float = 0.5, w_nodes: float = 0.5, w_edge: float = 2.0, alpha: float = 7.5,
                 bg_ce_threshold: float = 0.6, w_logits: float = 3.0, w_deltas: float = 1.0, w_fpn: float = 0.5,
                 topk: int = 1000, max_nodes: int = 100, num_levels: int = 5):
        super().__init__(family, student_channels, teacher_channels)
        self.w_fg, self.w_bg, self.w_nodes, self.w_edge = w_fg, w_bg, w_nodes, w_edge
        self.alpha, self.threshold = alpha, bg_ce_threshold
        self.w_logits, self.w_deltas, self.w_fpn = w_logits, w_deltas, w_fpn
        self.topk, self.max_nodes = topk, max_nodes
        self.needs_teacher_dense = family == "retinanet"  # only the RetinaNet head KD reads it
        self.roi_adapter = optional_roi_adapter(student_channels, teacher_channels)
        self.fpn_adapters = nn.ModuleList(optional_adapter(student_channels, teacher_channels) for _ in range(num_levels))
        if family == "retinanet":
            self.pool = GatherMultiScaleRoIAlign(POOL_LEVELS, 7, 2)

    # -- two-stage -----------------------------------------------------------------------------------
    def _two_stage(self, inputs: DistillInputs) -> dict[str, Tensor]:
        st = inputs.student
        counts = [len(r) for r in st.rois]
        t_pooled, t_logits, t_deltas = inputs.teacher_rois(st.rois)
        s_pooled = self.roi_adapter(st.roi_features)
        l_fg, l_bg, l_edge = graph_losses(s_pooled.split(counts), t_pooled.split(counts), st.roi_labels,
                                          t_logits.split(counts), self.alpha, self.threshold)
        losses = {"distill/nodes_fg": self.w_fg * l_fg, "distill/nodes_bg": self.w_bg * l_bg,
                  "distill/edges": self.w_edge * l_edge}
        if self.w_logits:
            losses["distill/roi_logits"] = self.w_logits * kl_mean_over_elements(st.class_logits, t_logits)
        if self.w_deltas:
            labels = torch.cat(st.roi_labels)
            fg = torch.nonzero(labels > 0).squeeze(1)
            cols = labels[fg]
            s_d = st.box_deltas.reshape(len(labels), -1, 4)[fg, cols]
            t_d = t_deltas.reshape(len(labels), -1, 4)[fg, cols]
            losses["distill/roi_deltas"] = self.w_deltas * (s_d - t_d).abs().sum() / max(len(labels), 1)
        if self.w_fpn:
            losses["distill/fpn"] = self.w_fpn * fpn_mse(st.features, inputs.teacher_features, self.fpn_adapters)
        return losses

    # -- one-stage -----------------------------------------------------------------------------------
    @torch.no_grad()
    def student_detections(self, inputs: DistillInputs) -> list[Tensor]:
        """Boxes of the student's current detections per image (the RetinaNet graph's nodes)."""
        dense = inputs.student.dense
        logits, deltas, splits = dense.logits, dense.deltas, dense.num_per_level
        num_classes = logits.shape[-1]
        nodes = []
        for i, anchors in enumerate(dense.anchors):
            boxes_all, scores_all, labels_all = [], [], []
            for lg, dl, an in zip(logits[i].split(splits), deltas[i].split(splits), anchors.split(splits)):
                scores = torch.sigmoid(lg.float()).flatten()
                keep = torch.nonzero(scores > 0).squeeze(1)
                top = scores[keep].topk(min(self.topk, keep.numel())).indices
                idx = keep[top]
                anchor_idx, label = idx // num_classes, idx % num_classes
                boxes = dense.box_coder.decode_single(dl[anchor_idx].float(), an[anchor_idx])
                boxes_all.append(clip_boxes_to_image(boxes, inputs.images.image_sizes[i]))
                scores_all.append(scores[idx])
                labels_all.append(label)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
            keep = first_k_batched_nms(boxes, scores, labels, 0.5, self.max_nodes)  # = batched_nms(...)[:max_nodes]
            nodes.append(boxes[keep])
        return nodes

    def _one_stage(self, inputs: DistillInputs) -> dict[str, Tensor]:
        st = inputs.student
        boxes = self.student_detections(inputs)
        sizes = inputs.images.image_sizes
        s_pooled = self.roi_adapter(self.pool(st.features, boxes, sizes))
        with torch.no_grad():
            t_pooled = self.pool(inputs.teacher_features, boxes, sizes)
        zero = zero_if_empty(s_pooled) + zero_if_empty(st.dense.logits)
        l_nodes, l_edge = zero, zero
        for s, t in zip(s_pooled.split([len(b) for b in boxes]), t_pooled.split([len(b) for b in boxes])):
            if s.shape[0]:
                l_nodes = l_nodes + F.mse_loss(s, t)
                l_edge = l_edge + edge_loss(s, t)
        losses = {"distill/nodes": self.w_nodes * l_nodes, "distill/edges": self.w_edge * l_edge}
        if self.w_fpn:
            losses["distill/fpn"] = self.w_fpn * fpn_mse(st.features, inputs.teacher_features, self.fpn_adapters)
        matched = torch.stack(st.matched_idxs)  # [N, HWA]
        if self.w_logits:
            valid = matched != -2  # BetweenThresholds (ignored) anchors are excluded
            s_l, t_l = st.dense.logits[valid].float(), inputs.teacher_dense.logits[valid].float()
            kl = kl_mean_over_elements(s_l, t_l) if s_l.numel() else zero
            losses["distill/head_logits"] = self.w_logits * kl
        if self.w_deltas:
            pos = matched >= 0
            s_d, t_d = st.dense.deltas[pos], inputs.teacher_dense.deltas[pos]
            losses["distill/head_deltas"] = self.w_deltas * (s_d - t_d).abs().sum() / max(int(pos.sum()), 1)
        return losses

    def forward(self, inputs: DistillInputs):
        return self._two_stage(inputs) if self.family == "fasterrcnn" else self._one_stage(inputs)
