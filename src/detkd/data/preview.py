"""A contact sheet of dataset images with their boxes, for people to look at (``reports/data_preview.png``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from detkd.data.coco import CocoIndex
from detkd.io import atomic_path

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def draw_boxes(image: Image.Image, boxes, labels, names, scores=None) -> Image.Image:
    """Return a copy of ``image`` with xyxy ``boxes`` drawn and captioned by class name (and score)."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    for k, (box, label) in enumerate(zip(boxes, labels)):
        colour = _PALETTE[int(label) % len(_PALETTE)]
        draw.rectangle([float(v) for v in box], outline=colour, width=1)
        caption = names[int(label)] if int(label) < len(names) else str(int(label))
        if scores is not None:
            caption += f" {float(scores[k]):.2f}"
        draw.text((float(box[0]) + 1, float(box[1]) - 10), caption, fill=colour)
    return image


def write_preview(index: CocoIndex, path: str | Path, count: int = 16, columns: int = 4, scale: int = 2) -> None:
    """Draw the first ``count`` images of ``index`` with ground truth into a grid PNG at ``path``."""
    records = index.images[:count]
    if not records:
        return
    tiles = []
    for rec in records:
        image = Image.open(rec.path).convert("RGB")
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        tiles.append(draw_boxes(image, rec.boxes * scale, rec.labels, index.label_names))
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * width, (k // columns) * height))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
