"""Every method x family: finite terms, gradients reach the student and adapters and never the teacher,
the teacher is unchanged by a step, images with 0 and 1 boxes work. Then each mechanism on hand-built
inputs with known answers."""

import math

import pytest
import torch

from detkd.distill import METHODS, build_method
from detkd.distill.defeat import decoupled_sq_error, group_kl
from detkd.distill.masks import assign_levels, level_object_masks, rasterise
from detkd.distill.wrapper import DistillationModel, check_compatible
from detkd.errors import ConfigError
from detkd.models.builder import build_detector, make_spec

from test_models import TINY

FAMILIES = ["fasterrcnn", "retinanet"]
HPARAMS = {"defeat": {"level_base": 8.0}}


# A student narrower than its teacher everywhere the architecture allows: FPN width, RoI-head size, RPN
# proposals, sampled RoIs, detections, RetinaNet tower depth.
NARROW = TINY.model_copy(update={"fpn_channels": 16, "representation_size": 24, "rpn_post_nms_top_n_train": 30,
                                 "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 8, "detections_per_image": 10,
                                 "head_depth": 2, "topk_candidates": 100})


def _pair(family, method, student_cfg=TINY, student_backbone="resnet18"):
    torch.manual_seed(0)
    teacher = build_detector(make_spec(family, "resnet34", 3, TINY))
    student = build_detector(make_spec(family, student_backbone, 3, student_cfg))
    m = build_method(method, family, student_cfg.fpn_channels, TINY.fpn_channels, HPARAMS.get(method, {}))
    return DistillationModel(student, teacher, m).train()


def _batch(n_boxes):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]])[:n_boxes]
    return images, [{"boxes": boxes.clone(), "labels": torch.arange(1, n_boxes + 1)} for _ in images]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("n_boxes", [0, 1, 2])
def test_method_contract(family, method, n_boxes):
    model = _pair(family, method)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        probe = torch.rand(1, 3, 64, 64)
        teacher_out_before = [f.clone() for f in model.teacher.backbone(probe).values()]
    losses = model(*_batch(n_boxes))
    assert all(k.startswith(("task/", "distill/")) for k in losses)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    if method != "none":
        assert any(k.startswith("distill/") for k in losses)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())
    distill_terms = {k: v for k, v in losses.items() if k.startswith("distill/") and v.requires_grad}
    if distill_terms and any(p.requires_grad for p in model.method.parameters()):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.parameters()), "adapters get no gradient"
    optimizer.step()
    assert all(torch.equal(teacher_before[k], v) for k, v in model.teacher.state_dict().items())  # BN stats too
    with torch.no_grad():
        after = list(model.teacher.backbone(probe).values())
    assert all(torch.equal(a, b) for a, b in zip(teacher_out_before, after))
    assert not model.teacher.training  # .train() on the wrapper never reaches the teacher
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in model.state_dict())


def _graph_signature(path) -> tuple:
    """What an extra module in an ONNX file would change: the operators it runs and the weight shapes it
    holds. (Exporting de-duplicates equal-valued weights behind Identity nodes, so counts of weights and
    Identity nodes depend on the values; these two do not.)"""
    from collections import Counter

    import onnx

    graph = onnx.load(str(path)).graph
    return Counter(n.op_type for n in graph.node if n.op_type != "Identity"), {tuple(t.dims) for t in graph.initializer}


@pytest.fixture(scope="module")
def plain_student_onnx(tmp_path_factory):
    """Per family, the graph signature of the narrow student exported without any distillation."""
    from test_export import tiny_info

    from detkd.export.onnx_export import export_onnx

    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        student = build_detector(make_spec(family, "mobilenet_v3_small", 3, NARROW)).eval()
        path = tmp_path_factory.mktemp("plain") / f"{family}.onnx"
        export_onnx(student, tiny_info(student), path, simplify=False)  # value-independent structure
        out[family] = _graph_signature(path)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"none"}))
def test_method_with_a_narrower_student(family, method, tmp_path, plain_student_onnx):
    """Every method works when the student's FPN width, RoI head, proposals and towers differ from the
    teacher's: finite terms, gradients reach the student and the method's adapters and never the teacher;
    the student's checkpoint holds only the student, and its ONNX file has no adapter in it."""
    from test_export import tiny_info

    from detkd.engine.checkpoint import save_model_checkpoint
    from detkd.export.onnx_export import export_onnx
    from detkd.training import load_detector

    model = _pair(family, method, NARROW, "mobilenet_v3_small")
    assert NARROW.fpn_channels != TINY.fpn_channels
    losses = model(*_batch(2))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    distill_terms = [v for k, v in losses.items() if k.startswith("distill/") and v.requires_grad]
    assert distill_terms
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())
    adapters = [p for p in model.method.parameters() if p.requires_grad]
    assert adapters, f"{method} has no student-side adapter although the widths differ"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters), "adapters get no gradient"
    optimizer.step()

    spec = make_spec(family, "mobilenet_v3_small", 3, NARROW)
    save_model_checkpoint(tmp_path / "student.pt", model.student, {"spec": spec.to_dict(), "category_ids": [1, 2, 3],
                                                                  "category_names": ["a", "b", "c"]})
    student, _ = load_detector(tmp_path / "student.pt")  # strict load: exactly the student's keys
    export_onnx(student, tiny_info(student), tmp_path / "student.onnx", simplify=False)
    assert _graph_signature(tmp_path / "student.onnx") == plain_student_onnx[family]


def test_unknown_method_and_unserved_family():
    with pytest.raises(ConfigError, match=r"unknown method 'dsgi'; known methods: .*defeat.*fitnet"):
        build_method("dsgi", "fasterrcnn", 32, 32, {})
    with pytest.raises(ConfigError, match=r"distill.fasterrcnn.fitnet: unknown hyper-parameter .wieght.; allowed: weight"):
        build_method("fitnet", "fasterrcnn", 32, 32, {"wieght": 1.0})


def test_incompatible_teacher_is_refused():
    teacher = build_detector(make_spec("fasterrcnn", "resnet18", 3, TINY))
    student = build_detector(make_spec("fasterrcnn", "resnet18", 3, TINY.model_copy(update={"image_mean": [0.5, 0.5, 0.5]})))
    meta = {"category_ids": [1, 2, 3]}
    with pytest.raises(ConfigError, match="image_mean"):
        check_compatible(student, teacher, meta, meta)
    with pytest.raises(ConfigError, match=r"teacher classes \[1, 2, 4\] differ"):
        check_compatible(teacher, teacher, meta, {"category_ids": [1, 2, 4]})


# ---- mechanisms with known answers ------------------------------------------------------------------

def test_defeat_level_assignment_follows_the_code_rule():
    boxes = torch.tensor([[0, 0, 50, 50], [0, 0, 111, 111], [0, 0, 200, 200], [0, 0, 1000, 1000], [0, 0, 5000, 5000.0]])
    # sqrt((w+1)(h+1)) / 56: 0.9 -> P2, 2.0 -> P3, 3.6 -> P3, 17.9 -> P6 (4), clamped -> 4
    assert assign_levels(boxes, 56.0, 5).tolist() == [0, 1, 1, 4, 4]


def test_rasterise_floors_and_keeps_degenerate_boxes():
    mask = rasterise(torch.tensor([[4.0, 4.0, 12.0, 9.0], [13.0, 1.0, 13.5, 1.5]]), 4.0, 4, 4)
    expected = torch.zeros(4, 4)
    expected[1:2, 1:3] = 1  # rows floor(4/4)=1 .. floor(9/4)=2 (exclusive), cols 1 .. 3
    expected[0, 3] = 1  # the tiny box keeps its single corner cell
    assert torch.equal(mask, expected)


def test_defeat_normalises_object_and_background_separately():
    student = torch.zeros(1, 2, 2, 2)
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, :, 0, 0] = 3.0  # the only object cell: error 9 per channel
    teacher[0, :, 1, 1] = 1.0  # one background cell: error 1 per channel
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    l_obj, l_bg = decoupled_sq_error(student, teacher, mask)
    assert l_obj.item() == pytest.approx(18 / (2 * 2))  # 2 channels x 9, over 2 x (1 cell x 2 channels)
    assert l_bg.item() == pytest.approx(2 / (2 * 6))  # 2 channels x 1, over 2 x (3 cells x 2 channels)
    _, empty_bg = decoupled_sq_error(student, teacher, torch.ones(1, 1, 2, 2))
    assert empty_bg.item() == 0.0  # no background elements: divided by max(1, 0), no NaN


def test_defeat_masks_put_each_box_on_one_level():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 40.0, 40.0]])}]
    masks = level_object_masks(targets, [(16, 16), (8, 8), (4, 4)], [4.0, 8.0, 16.0], base=8.0)
    # sqrt(81)/8 = 1.1 -> level 0 (cells [0,2)^2 at stride 4); sqrt(41*41)/8 = 5.1 -> level 2 ([0,2)^2 at stride 16)
    assert masks[0].sum() == 4 and masks[1].sum() == 0 and masks[2].sum() == 4


def test_group_kl_known_answer():
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p_T = (1/4, 3/4) and (1/2, 1/2)
    student = torch.zeros(2, 2)  # p_S = (1/2, 1/2)
    pos, neg = group_kl(student, teacher, torch.tensor([True, False]), tau=1.0)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert pos.item() == pytest.approx(expected, rel=1e-5) and neg.item() == pytest.approx(0.0, abs=1e-7)


def test_dsig_background_mining_threshold():
    from detkd.distill.dsig import mine_background

    # CE w.r.t. background = -log p(bg); p(bg) = 0.9 -> 0.105 (easy), p(bg) = 0.5 -> 0.693 (kept), 0.549 ~ 0.6 boundary
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.56, 0.44], [0.54, 0.46]]))
    assert mine_background(logits, 0.6).tolist() == [False, True, False, True]
    assert mine_background(torch.zeros(0, 2), 0.6).shape == (0,)


def test_dsig_adaptive_background_weight_and_per_image_sum():
    from detkd.distill.dsig import graph_losses

    s = [torch.full((4, 1, 1, 1), 0.5), torch.full((2, 1, 1, 1), 0.5)]
    t = [torch.ones(4, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0)]
    labels = [torch.tensor([1, 0, 0, 0]), torch.tensor([2, 0])]
    easy = torch.tensor([[10.0, -10.0]])  # the teacher is sure these are background: no mined nodes
    logits = [easy.repeat(4, 1), easy.repeat(2, 1)]
    l_fg, l_bg, l_edge = graph_losses(s, t, labels, logits, alpha=7.5, threshold=0.6)
    assert l_fg.item() == pytest.approx(0.25 + 2.25)  # per-image means, summed over images
    assert l_bg.item() == pytest.approx(7.5 * 1 / 3 * 0.25 + 7.5 * 1 / 1 * 2.25)  # w_i = alpha * n_fg / n_bg
    assert l_edge.item() == pytest.approx(0.0)  # single fg node per graph: both similarity matrices are [[1]]


def test_dsig_graph_losses_equal_the_masked_formula():
    """graph_losses reduces per node and gathers once; it must equal the terms written with masks."""
    import torch.nn.functional as F

    from detkd.distill.dsig import edge_loss, graph_losses, mine_background

    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(n, 3, 2, 2, generator=gen, dtype=torch.float64) for n in (9, 5, 4)]
    t = [torch.randn(n, 3, 2, 2, generator=gen, dtype=torch.float64) for n in (9, 5, 4)]
    labels = [torch.tensor([1, 0, 2, 0, 0, 3, 0, 1, 0]), torch.tensor([0, 0, 0, 0, 0]), torch.tensor([2, 1, 1, 3])]
    logits = [torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (9, 5, 4)]
    ref = [torch.zeros((), dtype=torch.float64) for _ in range(3)]
    for si, ti, lab, lg in zip(s, t, labels, logits):
        fg, bg = lab > 0, lab == 0
        if fg.any():
            ref[0] = ref[0] + F.mse_loss(si[fg], ti[fg])
        keep = torch.zeros(0, dtype=torch.bool)
        if bg.any():
            ref[1] = ref[1] + 7.5 * int(fg.sum()) / int(bg.sum()) * F.mse_loss(si[bg], ti[bg])
            keep = mine_background(lg[bg], 0.6)
        nodes_s, nodes_t = torch.cat([si[fg], si[bg][keep]]), torch.cat([ti[fg], ti[bg][keep]])
        if len(nodes_s):
            ref[2] = ref[2] + edge_loss(nodes_s, nodes_t)
    assert any(mine_background(lg[lab == 0], 0.6).any() for lg, lab in zip(logits, labels))  # mining exercised
    got = graph_losses(s, t, labels, logits, alpha=7.5, threshold=0.6)
    for g, r in zip(got, ref):
        assert g.item() == pytest.approx(r.item(), rel=1e-9)


def test_dsig_edge_loss_known_answer():
    from detkd.distill.dsig import edge_loss

    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal: E_S = I
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # parallel: E_T = ones
    assert edge_loss(student, teacher).item() == pytest.approx(0.5 * 2 / 4)  # two off-diagonal entries differ by 1


def test_gid_selection_score_topk_and_nms():
    from torchvision.models.detection._utils import BoxCoder, Matcher

    from detkd.distill.gid import select_general_instances
    from detkd.models.view import DenseOutputs

    anchors = torch.tensor([[0, 0, 20, 20], [2, 2, 22, 22], [40, 40, 60, 60], [80, 80, 100, 100], [0, 80, 4, 84.0]])
    def dense(probs):
        logits = torch.logit(torch.tensor(probs)).view(1, 5, 2)
        return DenseOutputs(logits, torch.zeros(1, 5, 4), [anchors], [5], BoxCoder((1.0, 1.0, 1.0, 1.0)), Matcher(0.5, 0.4))
    # per-anchor max_c |p_T - p_S|: 0.8, 0.7 (overlaps the first: suppressed by NMS 0.3), 0.5, 0.1, 0.9 (too small)
    teacher = dense([[0.9, 0.5], [0.8, 0.5], [0.5, 0.7], [0.5, 0.6], [0.95, 0.5]])
    student = dense([[0.1, 0.5], [0.1, 0.5], [0.5, 0.2], [0.5, 0.5], [0.05, 0.5]])
    gis = select_general_instances(student, teacher, [(100, 100)], k=2, nms_iou=0.3, min_box_side=10.0)
    assert gis[0].tolist() == [[0, 0, 20, 20], [40, 40, 60, 60]]  # score order, NMS, small box dropped, top-2


def test_gid_relation_loss_is_scale_invariant_and_zero_below_three():
    from detkd.distill.gid import relation_loss

    x = torch.randn(5, 3)
    assert relation_loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # distances normalised by their mean
    assert relation_loss(x[:2], x[:2] + 1).item() == 0.0
    assert relation_loss(x, torch.randn(5, 3)).item() > 0


def test_drkd_graph_reasoning_and_instance_relation_shapes_and_filter():
    from detkd.distill.drkd import GraphReasoning, InstanceRelation

    unit = GraphReasoning(8, 4)
    x = torch.randn(2, 8, 5, 6)
    assert unit(x).shape == x.shape
    with torch.no_grad():  # with a zero BN scale the unit is the identity (residual form)
        unit.bn.weight.zero_(), unit.bn.bias.zero_()
    assert torch.allclose(unit(x), x)
    block = InstanceRelation(8 * 9)
    r = torch.randn(3, 8, 3, 3)
    assert block(r).shape == r.shape
    m = block.relation_filter(r.flatten(1))
    assert m.shape == (3, 3) and torch.allclose(m.sum(1), torch.ones(3))  # row-stochastic re-weighting
    assert block(r[:1]).shape == (1, 8, 3, 3)  # one instance: a 1x1 softmax


def test_mar_multi_value_mask():
    from detkd.distill.mar import multi_value_mask

    mask = multi_value_mask(torch.tensor([[8.0, 8.0, 16.0, 16.0]]), 4.0, 8, 8)
    assert mask[2:4, 2:4].eq(1.0).all()  # inside the box
    assert mask[1, 1] == 0.5 and mask[4, 4] == 0.5  # the ring: box enlarged 2x about its centre -> [4, 20)
    assert mask[0, 0] == 0.1 and mask[7, 7] == 0.1  # far background
    assert mask.unique().tolist() == pytest.approx([0.1, 0.5, 1.0])
    assert multi_value_mask(torch.zeros(0, 4), 4.0, 2, 2).eq(0.1).all()


def test_dsig_logit_kl_divides_by_elements_like_torch_mean():
    from detkd.distill.dsig import kl_mean_over_elements

    s, t = torch.randn(6, 5), torch.randn(6, 5)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.softmax(t, 1), reduction="sum") / 30
    assert kl_mean_over_elements(s, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_method_asked_for_a_family_it_cannot_serve():
    from detkd.distill.base import DistillMethod, register

    @register
    class OneStageOnly(DistillMethod):
        name = "one_stage_only"
        families = ("retinanet",)

    try:
        with pytest.raises(ConfigError, match=r"'one_stage_only' does not serve fasterrcnn detectors \(it serves: retinanet\)"):
            build_method("one_stage_only", "fasterrcnn", 32, 32, {})
    finally:
        METHODS.pop("one_stage_only")


def test_dsig_defaults_are_family_specific():
    """The official one-stage configs weigh DSIG's edges and head-logit KD 1.0; the two-stage R18<-R50
    configs 2.0 and 3.0. Values set in params override either."""
    two, one = build_method("dsig", "fasterrcnn", 32, 32, {}), build_method("dsig", "retinanet", 32, 32, {})
    assert (two.w_edge, two.w_logits) == (2.0, 3.0) and (one.w_edge, one.w_logits) == (1.0, 1.0)
    assert build_method("dsig", "retinanet", 32, 32, {"w_edge": 0.25}).w_edge == 0.25
    from detkd.distill.base import published

    assert published("dsig", "retinanet")["w_edge"] == 1.0 and published("dsig", "fasterrcnn")["w_edge"] == 2.0


def test_every_method_declares_its_loss_weights():
    """The weights ``make compare`` sweeps are constructor arguments of float type."""
    from detkd.distill.base import published

    for name, cls in METHODS.items():
        if name == "none":
            continue
        assert cls.weight_keys, name
        for family in cls.families:
            values = published(name, family)
            assert all(isinstance(values[k], float) for k in cls.weight_keys), (name, family)


@pytest.mark.fault
def test_negative_loss_weight_is_refused():
    with pytest.raises(ConfigError, match=r"distill.fasterrcnn.mar.w_mask: a loss weight must be >= 0 .* got -1.0"):
        build_method("mar", "fasterrcnn", 32, 32, {"w_mask": -1.0})
    build_method("mar", "fasterrcnn", 32, 32, {"w_mask": 0.0})  # 0 switches the term off


def test_hyper_parameter_types_are_checked():
    with pytest.raises(ConfigError, match=r"distill.retinanet.gid.k: expected int, got 2.5"):
        build_method("gid", "retinanet", 32, 32, {"k": 2.5})
    build_method("dsig", "fasterrcnn", 32, 32, {"w_fg": 1})  # an int where a float is expected is fine


@pytest.mark.parametrize("family", FAMILIES)
def test_mar_reuses_the_students_own_classification_branch(family):
    """The maps MAR reads are the ones the student's forward computed (recorded, not recomputed), equal to
    a fresh pass of the branch; the recorder is idle outside training forwards."""
    from detkd.models.view import classification_features

    model = _pair(family, "mar")
    recorder = model._cls_recorder
    captured = {}
    original = model.method.relation_loss

    def spy(inputs):
        captured["maps"] = inputs.student_cls_features()
        captured["features"] = inputs.student.features
        return original(inputs)

    model.method.relation_loss = spy
    model(*_batch(1))
    maps = captured["maps"]
    assert len(maps) == len(captured["features"]) and all(m.requires_grad for m in maps)
    fresh = classification_features(model.student, captured["features"])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(maps, fresh))
    model.eval()
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    assert not recorder.active and len(recorder.outputs) == len(maps)  # evaluation recorded nothing
    assert _pair(family, "dsig")._cls_recorder is None  # only methods that read the maps record them


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou", [0.3, 0.7])
def test_first_k_nms_equals_torchvision_nms_prefix(seed, iou):
    from torchvision.ops import nms

    from detkd.distill.base import first_k_nms

    g = torch.Generator().manual_seed(seed)
    n = [0, 1, 5, 300, 3000, 3000][seed]
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    if seed == 5:
        scores = (scores * 10).round() / 10  # many ties
    for k in (1, 10, 50, n + 5):
        for block in (4, 32):
            assert torch.equal(first_k_nms(boxes, scores, iou, k, block=block), nms(boxes, scores, iou)[:k]), (n, k, block)


def test_drkd_one_image_batch_at_1x1_p7():
    """The loader keeps the last partial batch, so a RetinaNet batch can be one image whose P7 is 1x1: DRKD's
    GloRe BatchNorm then sees one value per channel and must not fail (running statistics normalise it)."""
    from torch.utils.data import Dataset

    from detkd.data.dataset import make_loader

    class Five(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.zeros(1), {"i": i}

    assert [len(images) for images, _ in make_loader(Five(), 4, 0)] == [4, 1]
    model = _pair("retinanet", "drkd")
    images, targets = _batch(2)
    losses = model(images[:1], targets[:1])
    with torch.no_grad():
        p7 = list(model.student.backbone(torch.rand(1, 3, 64, 64)).values())[-1]
    assert p7.shape[-2:] == (1, 1)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    glore = model.method.student_glore[-1]
    assert glore.to_state.weight.grad is not None and glore.bn.num_batches_tracked == 0  # no statistics from one value


@pytest.mark.parametrize("family,method", [("fasterrcnn", "gid"), ("retinanet", "dsig"), ("retinanet", "gid")])
def test_methods_pool_rois_with_the_detectors_level_rule(family, method):
    """``model.roi_canonical_size`` sets which pyramid level an RoI is pooled from, in the detector's own box
    head and in the methods' RoI pooling alike."""
    from torchvision.ops import MultiScaleRoIAlign

    cfg = TINY.model_copy(update={"roi_canonical_size": 36})
    teacher = build_detector(make_spec(family, "resnet18", 3, cfg))
    student = build_detector(make_spec(family, "resnet18", 3, cfg))
    if family == "fasterrcnn":
        assert student.roi_heads.box_roi_pool.canonical_scale == 36
    model = DistillationModel(student, teacher, build_method(method, family, 32, 32, HPARAMS.get(method, {})))
    pools = [m for m in model.method.modules() if isinstance(m, MultiScaleRoIAlign)]
    assert pools and all(p.canonical_scale == 36 for p in pools)
    losses = model.train()(*_batch(2))
    assert all(torch.isfinite(v) for v in losses.values())



@pytest.mark.parametrize("seed", [0, 1])
def test_first_k_batched_nms_equals_torchvision(seed):
    from torchvision.ops import batched_nms

    from detkd.distill.base import first_k_batched_nms

    g = torch.Generator().manual_seed(seed)
    for n in (0, 1, 50, 700):
        xy = torch.rand(n, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * 30], 1)
        scores, classes = torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g)
        for k in (1, 10, 100):
            want = batched_nms(boxes, scores, classes, 0.5)[:k]
            assert torch.equal(first_k_batched_nms(boxes, scores, classes, 0.5, k), want), (n, k)


def test_teacher_passes_on_request_are_timed_as_teacher_time():
    """The teacher's RoI head on DSIG's boxes is teacher computation: the wrapper times it apart from the
    method (``detkd.step_time`` subtracts it); a method that asks nothing of the teacher adds no such time."""
    dsig, fitnet = _pair("fasterrcnn", "dsig"), _pair("fasterrcnn", "fitnet")
    assert dsig.teacher_seconds == 0.0
    dsig(*_batch(2))
    fitnet(*_batch(2))
    assert dsig.teacher_seconds > 0.0 and fitnet.teacher_seconds == 0.0


def test_pointwise_roi_adapter_is_a_1x1_conv():
    """The RoI adapters compute a 1x1 convolution as a matrix product: same output, gradients, state dict."""
    from detkd.distill.base import PointwiseAdapter, conv_adapter

    torch.manual_seed(0)
    conv = conv_adapter(6, 10)
    torch.manual_seed(0)
    pointwise = PointwiseAdapter(6, 10)
    assert pointwise.state_dict().keys() == conv.state_dict().keys()
    for name, value in conv.state_dict().items():  # same initialisation from the same seed
        assert torch.equal(pointwise.state_dict()[name], value)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    conv, pointwise = conv.double(), pointwise.double()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(pointwise(b), conv(a))
    grad = torch.randn(5, 10, 7, 7, dtype=torch.float64)
    conv(a).backward(grad)
    pointwise(b).backward(grad)
    torch.testing.assert_close(b.grad, a.grad)
    torch.testing.assert_close(pointwise.weight.grad, conv.weight.grad)
