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
