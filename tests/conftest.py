"""Shared fixtures. Tests never write to the user's MLflow store: tracking goes to a temporary SQLite file."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

_TRACKING_DIR = tempfile.mkdtemp(prefix="detkd-test-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TRACKING_DIR}/mlflow.db"
os.environ.setdefault("DETKD_PIPELINE_ID", "pytest")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def coco_like(tmp_path: Path):
    """A COCO-shaped split: non-contiguous category ids (1, 7, 90), a crowd box, an image without
    annotations, a grayscale image, a box that needs clipping and a degenerate box."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(image_dir / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L").save(image_dir / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(image_dir / "empty.png")
    images = [
        {"id": 10, "file_name": "a.png", "width": 60, "height": 40},
        {"id": 11, "file_name": "gray.jpg", "width": 50, "height": 50},
        {"id": 12, "file_name": "empty.png", "width": 30, "height": 30},
    ]
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 90, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [50, 30, 20, 20], "area": 400, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},  # crowd
        {"id": 4, "image_id": 11, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},  # degenerate
        {"id": 5, "image_id": 11, "category_id": 7, "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0},
    ]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 7, "name": "train"}]
    ann = write_coco(tmp_path / "annotations" / "instances.json", images, annotations, categories)
    return ann, image_dir


# ---- a real training stage on tiny data (fault tests kill it, starve it of its tracking server...) ----
# 12 train images, batch 4: 3 iterations per epoch, 12 in all; a state every 2 iterations falls mid-epoch
# at 2, 4, 8 and 10
TINY_STAGE_OVERRIDES = {"train_student": {"epochs": 4, "checkpoint_every": 2, "hflip": 0.5},
                        "data": {"dev_fraction": 0.0}, "pretrain": {"enabled": False}}


@pytest.fixture(scope="session")
def tiny_stage(tmp_path_factory) -> Path:
    """A directory with ``prepared/`` (the smoke-sized generated data) and ``params.yaml`` for
    ``pipeline/train.py --role student`` (``stage_command``)."""
    import yaml

    from detkd.config import deep_merge, parse_params
    from detkd.data.prepare import prepare_dataset
    from detkd.smoke import SMOKE_OVERRIDES

    root = tmp_path_factory.mktemp("tiny-stage")
    raw = deep_merge(deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE_OVERRIDES),
                     TINY_STAGE_OVERRIDES)
    params = parse_params(raw)
    prepare_dataset(root / "prepared", params.data, params.seed)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def stage_command(root: Path, name: str) -> list[str]:
    """The student training stage writing ``<name>.pt``, ``<name>.csv`` and states in ``<name>-state/``."""
    import sys

    return [sys.executable, str(REPO / "pipeline/train.py"), "--role", "student", "--params", str(root / "params.yaml"),
            "--data", str(root / "prepared"), "--out", str(root / f"{name}.pt"), "--history", str(root / f"{name}.csv"),
            "--state-dir", str(root / f"{name}-state")]


def stage_env(**extra: str) -> dict:
    """One thread (bit-identical reruns), tracking off unless ``extra`` turns it on."""
    return {**os.environ, "DETKD_TRACKING": "off", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def state_iteration(path: Path):
    """The iteration of the periodic state at ``path``, or None while there is none (or it is being written)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    except Exception:
        return None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for the real servers the fault tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
