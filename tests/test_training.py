import math

import pytest
import torch
from torch import nn

from detkd.config import SyntheticConfig, TrainConfig
from detkd.data.coco import read_coco
from detkd.data.dataset import DetectionDataset
from detkd.data.synthetic import generate_dataset
from detkd.engine.checkpoint import load_file
from detkd.engine.optim import lr_factor
from detkd.engine.trainer import train
from detkd.errors import TrainingDivergedError


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_dataset(root, SyntheticConfig(num_train=8, num_val=2, image_size=32, max_object_size=20.0, max_objects=3), 0)
    return DetectionDataset(read_coco(root / "annotations/instances_train.json", root / "train"))


class BoxRegressor(nn.Module):
    """A small stand-in with the detector contract (images, targets) -> loss dict, fast enough for many runs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
        self.blow_up_at = None
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        pred = self.net(torch.stack(images))
        goal = torch.stack([t["boxes"].sum(0) / 32 if len(t["boxes"]) else torch.zeros(4) for t in targets])
        loss = ((pred - goal) ** 2).mean()
        if self.blow_up_at is not None and self.calls >= self.blow_up_at:
            loss = loss * float("nan")
        return {"loss_box": loss, "loss_const": pred.abs().mean() * 0.01}


CFG = TrainConfig(epochs=3, batch_size=2, lr=0.05, warmup_iters=2, checkpoint_every=3, log_every=1)


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_loss_goes_down_and_every_term_is_logged(tiny_dataset):
    torch.manual_seed(0)
    model = BoxRegressor()
    result = train(model, tiny_dataset, CFG.model_copy(update={"epochs": 6}), seed=0, device=torch.device("cpu"))
    assert result.iterations == 6 * 4
    first, last = result.history[0], result.history[-1]
    assert {"task/loss_box", "task/loss_const", "loss", "lr", "step"} <= set(first)
    assert last["task/loss_box"] < first["task/loss_box"]


def test_same_seed_same_numbers_and_resume_matches_uninterrupted(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    full = BoxRegressor()
    train(full, tiny_dataset, CFG, seed=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    again = BoxRegressor()
    train(again, tiny_dataset, CFG, seed=0, device=torch.device("cpu"))
    assert torch.equal(_weights(full), _weights(again))

    # interrupted run: diverge at call 8 (after the checkpoint at iteration 6), then resume
    state = tmp_path / "state.pt"
    torch.manual_seed(0)
    broken = BoxRegressor()
    broken.blow_up_at = 8
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at iteration 7 .*last good checkpoint is"):
        train(broken, tiny_dataset, CFG, seed=0, device=torch.device("cpu"), state_path=state, fingerprint="x")
    assert load_file(state)["iteration"] == 6  # the last good checkpoint is kept
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    resumed = BoxRegressor()
    result = train(resumed, tiny_dataset, CFG, seed=0, device=torch.device("cpu"), state_path=state, fingerprint="x")
    assert result.resumed_from == 6
    assert torch.allclose(_weights(full), _weights(resumed), atol=1e-6)


def test_state_with_other_fingerprint_is_ignored(tiny_dataset, tmp_path):
    state = tmp_path / "state.pt"
    train(BoxRegressor(), tiny_dataset, CFG.model_copy(update={"checkpoint_every": 1}), seed=0,
          device=torch.device("cpu"), state_path=state, fingerprint="a")
    result = train(BoxRegressor(), tiny_dataset, CFG, seed=0, device=torch.device("cpu"), state_path=state, fingerprint="b")
    assert result.resumed_from == 0


def test_schedule_warmup_and_cosine():
    cfg = TrainConfig(warmup_iters=10, warmup_factor=0.1, schedule="cosine")
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 100, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)
    step = TrainConfig(warmup_iters=0, schedule="step", step_milestones=[0.5, 0.75])
    assert [lr_factor(i, 100, step) for i in (0, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])


def test_teacher_notes_say_which_architecture_is_used_and_warn_about_wide_students():
    from detkd.config import parse_params
    from detkd.models.builder import make_spec
    from detkd.training import teacher_notes

    params = parse_params({"teacher": {"backbone": "resnet34", "fpn_channels": 64},
                           "student": {"backbone": "resnet18", "fpn_channels": 32}})
    teacher_spec = make_spec("fasterrcnn", "resnet34", 4, params.detector_config("teacher"))
    student_spec = make_spec("fasterrcnn", "resnet18", 4, params.detector_config("student"))
    assert teacher_notes(params, student_spec, {"spec": teacher_spec.to_dict()}, "t.pt") == []

    other = make_spec("fasterrcnn", "resnet50", 4, params.detector_config("teacher").model_copy(update={"fpn_channels": 96}))
    notes = teacher_notes(params, student_spec, {"spec": other.to_dict()}, "t.pt")
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "using the teacher as built in t.pt: backbone=resnet50 (params: resnet34), fpn_channels=96 (params: 64)" in notes[0]

    wide = make_spec("fasterrcnn", "resnet18", 4, params.detector_config("student").model_copy(
        update={"fpn_channels": 128, "representation_size": 512, "head_depth": 4}))
    notes = teacher_notes(params, wide, {"spec": teacher_spec.to_dict()}, "t.pt")
    assert len(notes) == 1 and "student is wider or deeper than its teacher on fpn_channels (128 > 64), " \
        "representation_size (512 > 256)" in notes[0]
    assert "head_depth" not in notes[0]  # a RetinaNet key says nothing about a Faster R-CNN
