"""What dvc.yaml declares for people to look at: every plot drawn once, one colour per model, the metrics small."""

import json

import yaml

from conftest import REPO

from detkd.bench.report import MODEL_COLOURS
from detkd.engine.trainer import loss_parts
from detkd.plots import write_history_csv


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _stage_plot_paths(pipeline: dict) -> list[str]:
    return [next(iter(p)) if isinstance(p, dict) else p
            for stage in pipeline["stages"].values() for p in stage.get("plots", [])]


def test_every_plot_is_declared_once():
    pipeline = _dvc_yaml()
    stage_plots = _stage_plot_paths(pipeline)
    top_sources = [path for plot in pipeline["plots"] for spec in plot.values() for path in spec["y"]]
    assert len(stage_plots) == len(set(stage_plots))
    assert not set(stage_plots) & set(top_sources), "a file drawn by a top-level plot is also a stage plot"
    assert all(p.endswith(".png") for p in stage_plots)  # data files are drawn by the top-level plots only


def test_top_level_plots_colour_each_model_as_the_figures_do():
    pipeline = _dvc_yaml()
    template = json.loads((REPO / ".dvc/plots/by_model.json").read_text())
    colour = template["encoding"]["color"]["scale"]
    assert dict(zip(colour["domain"], colour["range"])) == MODEL_COLOURS
    assert template["encoding"]["strokeDash"]["field"] == "rev"  # experiments differ by dash, models by colour
    for plot in pipeline["plots"]:
        (spec,) = plot.values()
        assert spec["template"] == "by_model"
    titles = [next(iter(p)) for p in pipeline["plots"]]
    assert not [t for t in titles if set(t) & set("'\"")], "a quote in a plot title breaks dvc's HTML page"
    task = next(p for p in pipeline["plots"] if "task loss" in next(iter(p)))
    assert task[next(iter(task))]["y"]["reports/train/distill.csv"] == "task_loss", titles  # not the total with KD terms


def test_dvc_plots_output_is_not_committed():
    assert "/dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()


def test_a_distillation_row_splits_into_the_detector_loss_and_the_distillation_loss(tmp_path):
    row = {"loss": 6.0, "task/loss_classifier": 1.0, "task/loss_box_reg": 0.5, "distill/fpn": 4.0, "distill/edges": 0.5}
    assert loss_parts(row) == {"task_loss": 1.5, "distill_loss": 4.5}
    assert loss_parts({"loss": 1.5, "task/loss_classifier": 1.5}) == {}  # a plain run: loss is the task loss
    write_history_csv(tmp_path / "h.csv", [{**row, **loss_parts(row), "step": 10, "epoch": 0, "lr": 0.1}])
    header = (tmp_path / "h.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["step", "epoch", "lr", "loss", "task_loss", "distill_loss"]
