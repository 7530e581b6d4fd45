"""Deterministic synthetic detection dataset written in the real COCO layout.

Contract: ``generate_dataset(out_dir, cfg, seed)`` writes
``out_dir/{train,val}/NNNNNN.png`` and ``out_dir/annotations/instances_{train,val}.json`` and returns
per-split statistics. The same (cfg, seed) gives byte-identical files on any machine: every image is drawn
from its own generator seeded by ``(seed, split, index)``, so the order of generation does not matter.

What makes it a detection problem rather than a toy:
- shape classes that come in confusable pairs (square/diamond, circle/ring, cross/star, triangle/hexagon):
  the two classes of a pair share a hue family (colour narrows an object down to its pair, only the
  shape tells the pair apart), so capacity matters;
- object sizes drawn log-uniformly from ``min_object_size`` (< 16 px, COCO "small") to
  ``max_object_size``, with random aspect, rotation, colour and an outline on some;
- a textured background (colour gradient + noise) and clutter (lines, arcs and irregular blobs that are
  not objects);
- overlaps: later objects occlude earlier ones, up to ``max_occlusion`` of an object's area;
- ``empty_fraction`` of the images contain clutter only.

Category ids are deliberately non-contiguous (1, 3, 5, ...) so the default run exercises the same
id mapping that real COCO (ids 1..90 with gaps) needs. ``area`` is the visible pixel count, as in COCO.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detkd.config import SyntheticConfig
from detkd.io import atomic_write_json

CLASS_NAMES = ("square", "diamond", "circle", "ring", "cross", "star", "triangle", "hexagon")
SPLITS = {"train": 0, "val": 1, "pretrain": 2}  # generator streams (pretrain: detkd.pretrain's images)


def category_id(label_index: int) -> int:
    """COCO category id of the ``label_index``-th synthetic class (0-based): 1, 3, 5, ..."""
    return 2 * label_index + 1


@dataclass
class _Placed:
    label: int
    mask: np.ndarray  # [H, W] bool, the object's full (unoccluded) silhouette


def _polygon(kind: str, cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with half-extent (w/2, h/2), rotated by ``angle``."""
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif kind == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif kind == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    elif kind == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif kind == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    else:  # pragma: no cover - guarded by CLASS_NAMES
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + (x * ca - y * sa) * w / 2, cy + (x * sa + y * ca) * h / 2) for x, y in pts]


def _object_mask(kind: str, size: int, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        hole = 0.55
        draw.ellipse([cx - w * hole / 2, cy - h * hole / 2, cx + w * hole / 2, cy + h * hole / 2], fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, w, h, angle), fill=255)
    return np.asarray(canvas) > 127


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[H, W, 3] float32 in 0..255: a random two-colour gradient plus pixel noise."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    img += rng.normal(0, rng.uniform(3, 14), (size, size, 3))
    return img.astype(np.float32)


def _draw_clutter(rng: np.random.Generator, img: Image.Image, count: int) -> None:
    draw = ImageDraw.Draw(img)
    size = img.size[0]
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:  # line
            x0, y0, x1, y1 = rng.uniform(0, size, 4)
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:  # arc
            x0, y0 = rng.uniform(-size * 0.2, size, 2)
            r = rng.uniform(4, size * 0.3)
            a0 = rng.uniform(0, 360)
            draw.arc([x0, y0, x0 + r, y0 + r], a0, a0 + rng.uniform(40, 200), fill=colour, width=int(rng.integers(1, 3)))
        else:  # irregular blob: a random polygon that is not one of the classes
            cx, cy = rng.uniform(0, size, 2)
            n = int(rng.integers(5, 9))
            radius = rng.uniform(2, size * 0.08)
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = radius * rng.uniform(0.3, 1.0, n)
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)], fill=colour)


def render_image(cfg: SyntheticConfig, seed: int, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """Draw one image. Returns ([H, W, 3] uint8, annotations as dicts with ``label``, ``bbox`` xywh, ``area``)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    size = cfg.image_size
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    _draw_clutter(rng, canvas, int(rng.integers(cfg.clutter // 2, cfg.clutter + 1)) if cfg.clutter else 0)
    pixels = np.asarray(canvas).astype(np.float32)

    n_objects = 0 if rng.random() < cfg.empty_fraction else int(rng.integers(1, cfg.max_objects + 1))
    placed: list[_Placed] = []
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the object visible at each pixel
    log_min, log_max = math.log(cfg.min_object_size), math.log(cfg.max_object_size)
    for _ in range(n_objects):
        for _attempt in range(10):
            label = int(rng.integers(0, cfg.num_classes))
            extent = math.exp(rng.uniform(log_min, log_max))
            aspect = math.exp(rng.uniform(-0.25, 0.25))
            w, h = extent * aspect, extent / aspect
            cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
            angle = rng.uniform(-0.25, 0.25)
            mask = _object_mask(CLASS_NAMES[label], size, cx, cy, w, h, angle)
            if mask.sum() < 4:
                continue
            new_owner = np.where(mask, len(placed), owner)
            visible_ok = all(
                (new_owner == j).sum() >= (1 - cfg.max_occlusion) * p.mask.sum() for j, p in enumerate(placed)
            )
            if visible_ok:
                owner = new_owner
                placed.append(_Placed(label, mask))
                colour = _class_colour(rng, label, cfg.num_classes)
                # Keep contrast with the local background so an object is always visible in principle.
                local = pixels[mask].mean(axis=0)
                if np.abs(colour - local).sum() < 120:  # darken or lighten, keeping the hue
                    colour = colour * 0.3 if local.mean() > 127 else 255 - (255 - colour) * 0.3
                pixels[mask] = colour + rng.normal(0, 4, (int(mask.sum()), 3))
                if rng.random() < 0.5:  # a darker outline on half of the objects
                    edge = mask & ~_erode(mask)
                    pixels[edge] = colour * 0.4
                break

    annotations = []
    for j, p in enumerate(placed):
        ys, xs = np.nonzero(p.mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        annotations.append(
            {"label": p.label, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((owner == j).sum())}
        )
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def _class_colour(rng: np.random.Generator, label: int, num_classes: int) -> np.ndarray:
    """RGB 0..255 from the hue family of ``label``'s pair (families evenly spaced, +-0.08 hue jitter)."""
    families = (num_classes + 1) // 2
    hue = (label // 2) / families + rng.uniform(-0.08, 0.08)
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
    return np.asarray(rgb) * 255.0


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def generate_split(out_dir: Path, cfg: SyntheticConfig, seed: int, split: str, count: int) -> dict:
    """Write ``count`` images of ``split`` and their COCO annotation file; return summary statistics."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        pixels, objects = render_image(cfg, seed, split, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, optimize=False)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id(obj["label"]),
                    "bbox": [round(v, 2) for v in obj["bbox"]],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": category_id(i), "name": CLASS_NAMES[i], "supercategory": "shape"} for i in range(cfg.num_classes)]
    coco = {
        "info": {"description": f"detkd synthetic shapes, split={split}, seed={seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_json(out_dir / "annotations" / f"instances_{split}.json", coco)
    sides = [math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in annotations]
    return {
        "images": count,
        "objects": len(annotations),
        "empty_images": count - len({a["image_id"] for a in annotations}),
        "small_objects": sum(s < 16 for s in sides),
        "large_objects": sum(s >= 48 for s in sides),
    }


def generate_dataset(out_dir: str | Path, cfg: SyntheticConfig, seed: int) -> dict:
    """Write the train and val splits under ``out_dir``; return ``{split: statistics}``."""
    out_dir = Path(out_dir)
    return {
        "train": generate_split(out_dir, cfg, seed, "train", cfg.num_train),
        "val": generate_split(out_dir, cfg, seed, "val", cfg.num_val),
    }
