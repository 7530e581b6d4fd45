"""Read and validate a COCO-format detection split (the synthetic default or real COCO 2017).

Contract: ``read_coco(annotation_file, image_dir)`` returns a ``CocoIndex`` whose records hold boxes in
xyxy pixels and *contiguous* labels 1..K (0 is background in torchvision), plus the maps back to the
file's category ids for evaluation. Any problem raises ``DataError`` naming the file and the offending
value. Policy for annotations, checked in this order:

- malformed (``bbox`` not 4 finite numbers, negative width or height, a box lying entirely outside its
  image, an unknown ``category_id`` or ``image_id``) -> ``DataError``;
- crowd (``iscrowd: 1``) -> kept out of training targets (pycocotools still uses them to ignore
  matching detections at evaluation);
- partly outside the image -> clipped to the image;
- degenerate (zero width/height, or smaller than ``min_box_size`` px after clipping) -> dropped and
  counted in ``stats``; never an error, never a crash in training.

Security: ``file_name`` values are resolved inside ``image_dir``; absolute names or ``..`` that would
leave it are rejected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detkd.errors import DataError


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # [n, 4] float32 xyxy in pixels
    labels: np.ndarray  # [n] int64, contiguous 1..K


@dataclass
class CocoIndex:
    annotation_file: Path
    images: list[ImageRecord]
    category_ids: list[int]  # category_ids[label - 1] is the file's id of contiguous label ``label``
    category_names: list[str]
    stats: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (the detector predicts K + 1 including background)."""
        return len(self.category_ids)

    @property
    def label_names(self) -> list[str]:
        """Names indexed by contiguous label, index 0 being background."""
        return ["__background__", *self.category_names]


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read annotation file: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list key '{key}' (a COCO file needs images, annotations, categories)")
    return data


def _require_int(path: Path, where: str, obj: dict, key: str, positive: bool = False) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise DataError(f"{path}: {where}: '{key}' must be {kind}, got {value!r}")
    return value


def safe_image_path(image_dir: Path, file_name: object, annotation_file: Path, image_id: int) -> Path:
    """Resolve ``file_name`` inside ``image_dir``; refuse names that would escape it."""
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{annotation_file}: image {image_id}: 'file_name' must be a non-empty string, got {file_name!r}")
    root = image_dir.resolve()
    candidate = (root / file_name).resolve()
    if Path(file_name).is_absolute() or not candidate.is_relative_to(root):
        raise DataError(
            f"{annotation_file}: image {image_id}: file_name {file_name!r} points outside the image directory {image_dir}"
        )
    return candidate


def _parse_categories(path: Path, categories: list) -> tuple[list[int], list[str]]:
    ids, names = [], []
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict):
            raise DataError(f"{path}: categories[{k}] must be an object with 'id' and 'name'")
        cid = _require_int(path, f"categories[{k}]", cat, "id")
        if cid in ids:
            raise DataError(f"{path}: categories[{k}]: duplicate category id {cid}")
        ids.append(cid)
        names.append(str(cat.get("name", cid)))
    if not ids:
        raise DataError(f"{path}: 'categories' is empty; at least one category is needed")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return [ids[i] for i in order], [names[i] for i in order]


def read_coco(
    annotation_file: str | Path, image_dir: str | Path, min_box_size: float = 1.0, check_files: bool = True
) -> CocoIndex:
    """Parse and validate one split. ``check_files`` verifies that every image file exists."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = _load_json(path)
    category_ids, category_names = _parse_categories(path, data["categories"])
    label_of = {cid: k + 1 for k, cid in enumerate(category_ids)}
    if check_files and not image_dir.is_dir():
        raise DataError(f"{image_dir}: image directory not found (images of {path})")

    meta: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: images[{k}] must be an object")
        image_id = _require_int(path, f"images[{k}]", img, "id")
        if image_id in meta:
            raise DataError(f"{path}: images[{k}]: duplicate image id {image_id}")
        width = _require_int(path, f"image {image_id}", img, "width", positive=True)
        height = _require_int(path, f"image {image_id}", img, "height", positive=True)
        file_path = safe_image_path(image_dir, img.get("file_name"), path, image_id)
        if check_files and not file_path.is_file():
            raise DataError(f"{file_path}: image file not found (image id {image_id} in {path})")
        meta[image_id] = {"path": file_path, "width": width, "height": height, "boxes": [], "labels": []}

    stats = {"annotations": 0, "crowd": 0, "clipped": 0, "degenerate_dropped": 0}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{k}] must be an object")
        where = f"annotation {ann.get('id', f'#{k}')}"
        image_id = _require_int(path, where, ann, "image_id")
        if image_id not in meta:
            raise DataError(f"{path}: {where}: image_id {image_id} is not in 'images'")
        cid = _require_int(path, where, ann, "category_id")
        if cid not in label_of:
            raise DataError(f"{path}: {where}: unknown category_id {cid}; known ids: {category_ids}")
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            raise DataError(f"{path}: {where}: 'bbox' must be [x, y, width, height] with 4 finite numbers, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            raise DataError(f"{path}: {where}: bbox {bbox} has negative width or height")
        img = meta[image_id]
        if x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
            if w > 0 and h > 0:
                raise DataError(
                    f"{path}: {where}: bbox {bbox} lies entirely outside image {image_id} ({img['width']}x{img['height']})"
                )
        stats["annotations"] += 1
        if ann.get("iscrowd", 0):
            stats["crowd"] += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            stats["clipped"] += 1
        if x1 - x0 < max(min_box_size, 1e-6) or y1 - y0 < max(min_box_size, 1e-6):
            stats["degenerate_dropped"] += 1
            continue
        img["boxes"].append([x0, y0, x1, y1])
        img["labels"].append(label_of[cid])

    records = [
        ImageRecord(
            image_id=image_id,
            path=m["path"],
            width=m["width"],
            height=m["height"],
            boxes=np.asarray(m["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(m["labels"], dtype=np.int64),
        )
        for image_id, m in sorted(meta.items())
    ]
    stats["images"] = len(records)
    stats["images_without_boxes"] = sum(1 for r in records if len(r.labels) == 0)
    return CocoIndex(path, records, category_ids, category_names, stats)
