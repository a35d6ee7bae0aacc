"""Reading image and mask files as arrays, with EXIF orientation applied.

Provisional version (PIL + ``ImageOps.exif_transpose``): the command line for a reader's own
images (:mod:`adcore.own`) reads every file through these two functions.

- :func:`read_image`: float32 (H, W, C) in [0, 1]; 16-bit images are scaled by their range
  (0-65535), 8-bit by 255.
- :func:`read_mask`: bool (H, W); any non-zero pixel is a defect.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_MODES", "read_image", "read_mask"]

#: the output modes of :func:`read_image`
IMAGE_MODES = ("RGB", "L")


def _to_float(img: Image.Image) -> np.ndarray:
    """A PIL image -> float32 array in [0, 1], scaled by the range of its sample type."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greys arrive as mode I or I;16: their range is 0-65535 whatever the content.
        return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return np.asarray(img, dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Read an image file, EXIF orientation applied.

    Args:
        path: a PNG, JPEG, BMP or TIFF file.
        mode: ``"RGB"`` (grey images are replicated to three channels) or ``"L"`` (luminance).

    Returns:
        float32 (H, W, C) in [0, 1], C = 3 for ``"RGB"`` and 1 for ``"L"``.

    Raises:
        ValueError: the file cannot be decoded as an image (the message names it and says
            why), or ``mode`` is not one of :data:`IMAGE_MODES`.
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {IMAGE_MODES}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                grey = _to_float(img)
                array = np.repeat(grey[..., None], 3 if mode == "RGB" else 1, axis=2)
            else:
                array = _to_float(img.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if array.ndim == 2:
        array = array[..., None]
    return np.ascontiguousarray(array, dtype=np.float32)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a defect mask: bool (H, W), True where the file is non-zero (EXIF orientation applied).

    Raises:
        ValueError: the file cannot be decoded as an image (the message names it).
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    if array.ndim == 3:
        array = array.any(axis=2)
    return array != 0
