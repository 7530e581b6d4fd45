"""The ``prepare`` stage's library half: make (synthetic) or validate (COCO) the dataset and write the
manifest ``dataset.json`` that every later stage opens the data through.

The output directory is built in a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from detkd.config import DataConfig
from detkd.data.coco import read_coco
from detkd.data.dataset import MANIFEST
from detkd.data.synthetic import generate_dataset
from detkd.errors import DataError
from detkd.io import atomic_write_json


def _layout(data: DataConfig) -> tuple[str, dict]:
    if data.source == "synthetic":
        return ".", {
            "train": {"images": "train", "annotations": "annotations/instances_train.json"},
            "val": {"images": "val", "annotations": "annotations/instances_val.json"},
        }
    root = Path(data.root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.root: COCO directory {root} not found")
    c = data.coco
    return str(root), {
        "train": {"images": c.train_images, "annotations": c.train_annotations},
        "val": {"images": c.val_images, "annotations": c.val_annotations},
    }


def prepare_dataset(out_dir: str | Path, data: DataConfig, seed: int) -> dict:
    """Write ``out_dir`` (manifest, plus the images for the synthetic source); return the manifest."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        generated = generate_dataset(work, data.synthetic, seed) if data.source == "synthetic" else None
        root, splits = _layout(data)
        base = work if root == "." else Path(root)
        stats, classes = {}, None
        for split, entry in splits.items():
            index = read_coco(base / entry["annotations"], base / entry["images"], min_box_size=data.min_box_size)
            stats[split] = index.stats
            names = index.category_names
            if classes is not None and names != classes:
                raise DataError(f"{base / entry['annotations']}: categories differ from the train split's")
            classes = names
        manifest = {
            "source": data.source,
            "root": root,
            "splits": splits,
            "classes": classes,
            "stats": stats,
            "generated": generated,
        }
        atomic_write_json(work / MANIFEST, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
