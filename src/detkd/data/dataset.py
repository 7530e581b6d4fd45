"""The prepared-dataset manifest, the torch ``Dataset`` and a deterministic, resumable sampler.

``data/prepared/dataset.json`` (written by the ``prepare`` stage) says where each split's images and
annotation file are; every later stage opens the data through ``open_split`` so no path is written twice.
Relative paths in the manifest are relative to the manifest's directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from detkd.data.coco import CocoIndex, read_coco
from detkd.data.transforms import hflip, pil_to_tensor
from detkd.errors import DataError
from detkd.pixels import PixelFormatError, to_rgb8

MANIFEST = "dataset.json"


def load_manifest(prepared_dir: str | Path) -> dict:
    import json

    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: dataset manifest not found; run the 'prepare' stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def split_paths(prepared_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image directory) of ``split`` ('train', 'val', or the 'fit'/'dev' halves of train)
    as recorded in the manifest. Paths are relative to the data root, except annotation files the
    prepare stage wrote itself (``"annotations_in": "manifest"``), which are relative to the manifest."""
    prepared_dir = Path(prepared_dir)
    manifest = load_manifest(prepared_dir)
    if split not in manifest.get("splits", {}):
        raise DataError(f"{prepared_dir / MANIFEST}: no split '{split}'; available: {sorted(manifest.get('splits', {}))}")
    entry = manifest["splits"][split]
    root = Path(manifest["root"])
    root = root if root.is_absolute() else prepared_dir / root
    annotations_root = prepared_dir if entry.get("annotations_in") == "manifest" else root
    return annotations_root / entry["annotations"], root / entry["images"]


def open_split(prepared_dir: str | Path, split: str, min_box_size: float = 1.0, check_files: bool = True) -> CocoIndex:
    annotations, images = split_paths(prepared_dir, split)
    return read_coco(annotations, images, min_box_size=min_box_size, check_files=check_files)


def read_image(path: Path) -> Image.Image:
    """Open an image as RGB (``detkd.pixels.to_rgb8``: 16-bit scaled, transparency over white; no EXIF
    rotation, COCO boxes refer to the stored pixels) or raise ``DataError`` naming the file."""
    try:
        with Image.open(path) as image:
            return Image.fromarray(to_rgb8(image))
    except PixelFormatError as exc:
        raise DataError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


class DetectionDataset(Dataset):
    """Items are ``(image [3,H,W] float 0..1, target)`` with target keys ``boxes`` (xyxy), ``labels``,
    ``image_id``. Indices may be ``(index, flip)`` pairs from ``EpochSampler`` to apply a horizontal flip."""

    def __init__(self, index: CocoIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index.images)

    def __getitem__(self, item):
        idx, flip = item if isinstance(item, tuple) else (item, False)
        rec = self.index.images[idx]
        image = read_image(rec.path)
        if image.size != (rec.width, rec.height):
            raise DataError(
                f"{rec.path}: image is {image.size[0]}x{image.size[1]} but {self.index.annotation_file} says "
                f"{rec.width}x{rec.height}"
            )
        tensor = pil_to_tensor(image)
        boxes = torch.from_numpy(rec.boxes.copy())
        if flip:
            tensor, boxes = hflip(tensor, boxes)
        target = {"boxes": boxes, "labels": torch.from_numpy(rec.labels.copy()), "image_id": rec.image_id}
        return tensor, target


class EpochSampler(Sampler):
    """Deterministic per-epoch order and flip decisions, sharded across ranks, resumable mid-epoch.

    The permutation and flips of epoch ``e`` depend only on ``(seed, e)``; rank ``r`` of ``world`` takes
    every ``world``-th item (the list is padded by wrapping so all ranks get equal counts, as
    ``DistributedSampler`` does). ``skip`` drops the first items of this rank's share (for resuming).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, hflip_p: float = 0.0, rank: int = 0, world: int = 1):
        self.size, self.seed, self.shuffle, self.hflip_p = size, seed, shuffle, hflip_p
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(size / world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist() if self.shuffle else list(range(self.size))
        flips = (torch.rand(self.size, generator=gen) < self.hflip_p).tolist()
        order = (order * math.ceil(self.per_rank * self.world / max(self.size, 1)))[: self.per_rank * self.world]
        mine = order[self.rank :: self.world]
        for idx in mine[self.skip :]:
            yield idx, bool(flips[idx])


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


def make_loader(
    dataset: Dataset, batch_size: int, workers: int, sampler: Optional[Sampler] = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        persistent_workers=False,
    )
