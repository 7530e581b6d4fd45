"""Letterboxing and mapping detections back: the same arithmetic as torchvision's detection transform.

Contract:
- ``letterbox(image, info) -> (array [3, S, S] float32, (resized_h, resized_w))``: ``image`` is an
  ``H x W x 3`` uint8 RGB array; it is scaled as ``GeneralizedRCNNTransform`` scales it (factor
  ``min(min_size / shorter, max_size / longer)``, output size ``floor(side * factor)``, bilinear with
  half-pixel centres and no antialiasing, i.e. ``F.interpolate(..., recompute_scale_factor=True)``), put
  top-left and padded with the normalisation mean (0 after normalisation, like torchvision's padding).
- ``to_image_coordinates(boxes, resized, original)`` maps xyxy boxes back with torchvision's per-axis
  ratios and clips them to the original image.
- ``read_image(path)`` -> RGB uint8 array as displayed (EXIF orientation, 16-bit, alpha handled), or
  ``InferenceInputError`` naming the file; ``check_detectable`` refuses images too thin to resize.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from detkd.errors import InferenceInputError
from detkd.pixels import PixelFormatError, to_rgb8
from detkd.runtime.metadata import ModelInfo


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``H x W x 3`` as the image is displayed: EXIF orientation applied (boxes then refer to the
    pixels a viewer shows), 16-bit greyscale scaled to 8 bits (Pillow's own conversion saturates it to
    white), transparency composited over white. ``InferenceInputError`` naming the file for a missing,
    unreadable or oversized file, and for pixel formats whose range is not known (32-bit integer or float)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and opened.width * opened.height > limit:  # Pillow itself only warns up to twice its limit
                raise InferenceInputError(f"{path}: {opened.width}x{opened.height} = {opened.width * opened.height} "
                                          f"pixels is above the limit of {limit} (deploy/infer.py --max-pixels)")
            return _to_rgb8(ImageOps.exif_transpose(opened), path)
    except FileNotFoundError:
        raise InferenceInputError(f"{path}: image not found") from None
    except Image.DecompressionBombError as exc:
        raise InferenceInputError(f"{path}: {str(exc).splitlines()[0]} (set PIL.Image.MAX_IMAGE_PIXELS higher "
                                  "only for files you trust)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InferenceInputError(f"{path}: not a readable image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _to_rgb8(img, path) -> np.ndarray:
    try:
        return to_rgb8(img)
    except PixelFormatError as exc:
        raise InferenceInputError(f"{path}: {exc}") from None


def check_detectable(shape: tuple[int, ...], info: ModelInfo, name: str = "image") -> None:
    """``InferenceInputError`` when an ``H x W`` image (``name`` in the message) would have a side of 0
    pixels after the model's resize (an extreme aspect ratio such as 2000 x 2)."""
    h, w = shape[:2]
    rh, rw = resized_shape(h, w, info.min_size, info.max_size)
    if rh < 1 or rw < 1:
        raise InferenceInputError(f"{name}: image {h}x{w} is too thin for this model: it would be {rh}x{rw} px after "
                                  f"resizing to min_size {info.min_size} / max_size {info.max_size}")


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def _interpolation(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D bilinear resize (half-pixel, as torch's align_corners=False)."""
    position = (np.arange(dst, dtype=np.float32) + 0.5) * np.float32(src / dst) - 0.5
    position = np.maximum(position, 0.0)
    lo = np.minimum(np.floor(position).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    return lo, hi, (position - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, H, W]`` float32 -> ``[C, height, width]``."""
    if image.shape[1:] == (height, width):
        return image
    y0, y1, wy = _interpolation(image.shape[1], height)
    x0, x1, wx = _interpolation(image.shape[2], width)
    rows = image[:, y0, :] * (1 - wy)[None, :, None] + image[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def letterbox(image: np.ndarray, info: ModelInfo) -> tuple[np.ndarray, tuple[int, int]]:
    if image.ndim != 3 or image.shape[2] != 3:
        raise InferenceInputError(f"expected an H x W x 3 RGB image, got an array of shape {image.shape}")
    check_detectable(image.shape, info)
    h, w = image.shape[:2]
    rh, rw = resized_shape(h, w, info.min_size, info.max_size)
    if rh > info.input_size or rw > info.input_size:
        raise InferenceInputError(f"resized image {rh}x{rw} exceeds the model input {info.input_size}")
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    out = np.empty((3, info.input_size, info.input_size), dtype=np.float32)
    out[:] = np.asarray(info.image_mean, dtype=np.float32)[:, None, None]
    out[:, :rh, :rw] = resize_bilinear(chw, rh, rw)
    return out, (rh, rw)


def to_image_coordinates(boxes: np.ndarray, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    ratio_h, ratio_w = original[0] / resized[0], original[1] / resized[1]
    out = boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype)
    out[:, 0::2] = out[:, 0::2].clip(0, original[1])
    out[:, 1::2] = out[:, 1::2].clip(0, original[0])
    return out
