"""The ``prepare`` stage's library half: make (synthetic) or validate (COCO) the dataset and write the
manifest ``dataset.json`` that every later stage opens the data through.

Besides ``train`` and ``val`` the manifest names two splits carved from train, for choosing
hyper-parameters without touching val: ``dev`` (``data.dev_fraction`` of the train images, drawn with the
top-level seed) and ``fit`` (the other train images). Their annotation files are written here, next to the
manifest; their images are train's.

The output directory is built in a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from detkd.config import DataConfig
from detkd.data.coco import CocoIndex, read_coco
from detkd.data.dataset import MANIFEST
from detkd.data.synthetic import generate_dataset
from detkd.errors import DataError
from detkd.io import atomic_write_json, current_umask


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


def check_image_headers(index: CocoIndex) -> None:
    """Every image of ``index`` opens (its header is read, not its pixels) and has the size its
    annotation file says; else a one-line ``DataError`` naming the image, so a corrupt or mismatched file
    stops ``prepare`` rather than a training run hours later."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    where = index.annotation_file
    for rec in tqdm(index.images, desc=f"prepare: checking the images of {Path(where).name}", unit="img",
                    disable=len(index.images) < 5000, mininterval=1.0):
        try:
            with Image.open(rec.path) as image:
                size = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"{rec.path}: not a readable image ({first}; image id {rec.image_id} in {where})") from None
        if size != (rec.width, rec.height):
            raise DataError(f"{rec.path}: image is {size[0]}x{size[1]} but {where} says {rec.width}x{rec.height} "
                            f"(image id {rec.image_id})")


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
            check_image_headers(index)
            stats[split] = index.stats
            names = index.category_names
            if classes is not None and names != classes:
                raise DataError(f"{base / entry['annotations']}: categories differ from the train split's")
            classes = names
        if data.dev_fraction > 0:
            for split, entry in carve_dev_split(base / splits["train"]["annotations"], work, data.dev_fraction,
                                                seed).items():
                splits[split] = {"images": splits["train"]["images"], "annotations": entry, "annotations_in": "manifest"}
                index = read_coco(work / entry, base / splits["train"]["images"], min_box_size=data.min_box_size)
                stats[split] = index.stats
        manifest = {
            "source": data.source,
            "root": root,
            "splits": splits,
            "classes": classes,
            "stats": stats,
            "generated": generated,
        }
        atomic_write_json(work / MANIFEST, manifest)
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes 0700; the published directory gets the usual mode
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


DEV_SEED_OFFSET = 7919  # the dev draw uses its own stream, so it does not move when the data generator changes


def carve_dev_split(train_annotations: Path, out_dir: Path, fraction: float, seed: int) -> dict[str, str]:
    """Split train's images into ``dev`` (``fraction`` of them, at least one, drawn with ``seed``) and ``fit``
    (the rest, at least one); write each as a COCO file under ``out_dir/annotations``. Returns split ->
    annotation path relative to ``out_dir``. Every image of train is in exactly one of the two."""
    coco = json.loads(Path(train_annotations).read_text())
    ids = sorted(int(im["id"]) for im in coco["images"])
    count = round(len(ids) * fraction)
    if not 1 <= count < len(ids):
        raise DataError(f"data.dev_fraction {fraction}: leaves {count} of the {len(ids)} train images for dev; "
                        "dev and fit each need at least one image (or set 0 to carve nothing)")
    dev = set(np.random.default_rng(seed + DEV_SEED_OFFSET).choice(ids, size=count, replace=False).tolist())
    out = {}
    for split, keep in (("dev", lambda i: i in dev), ("fit", lambda i: i not in dev)):
        subset = {**coco, "images": [im for im in coco["images"] if keep(int(im["id"]))],
                  "annotations": [a for a in coco["annotations"] if keep(int(a["image_id"]))]}
        rel = f"annotations/instances_{split}.json"
        (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / rel, subset)
        out[split] = rel
    return out
