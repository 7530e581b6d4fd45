"""Pixel formats to RGB uint8: one rule for the training data and for images given to a deployed model.

Contract: ``to_rgb8(image)`` takes an open PIL image and returns ``H x W x 3`` uint8 RGB: 16-bit
greyscale is scaled to 8 bits (Pillow's ``convert("RGB")`` saturates it to white), transparency (RGBA,
LA, PA, palette with a transparent index) is composited over white, every other mode Pillow converts
(L, P, CMYK, YCbCr, 1, RGB) as ``convert("RGB")`` does. 32-bit integer and float pixels have no known
range and raise ``PixelFormatError``. Orientation is the caller's choice (``deploy/infer.py`` applies EXIF
orientation; COCO annotations refer to the stored pixels, so training data does not).
"""

from __future__ import annotations

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class PixelFormatError(ValueError):
    """A pixel format whose range is not known; the message says what to do."""


def to_rgb8(image) -> np.ndarray:
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.rint(np.asarray(image, dtype=np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise PixelFormatError(f"{kind} pixels (Pillow mode {image.mode}) have no known range; save it as 8- or 16-bit")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
