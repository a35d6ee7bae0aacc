"""The package's one image reader: files read as the user sees them.

Every loader in :mod:`adcore.data` (MVTec layout, UCSD Ped1, cracks, CIFAR-10 folders) and the
defect sources of :mod:`adcore.synth` read their files through the two functions here, so one
rule holds everywhere:

- **orientation**: the EXIF orientation tag is applied, so a photo is read the way a viewer
  shows it, and a mask drawn on what the user saw lines up with its image;
- **range**: integer images are scaled by their type's true range (8-bit by 255, 16-bit by
  65 535, 32-bit by 2³² − 1), never clipped; floating-point images must already lie in [0, 1];
- **masks**: any non-zero pixel is a defect, whether the file stores 0/1, 0/255 or 0/65535
  (the alpha channel of a mask is ignored).

Chapter 1 (``book/01_data``) shows the loaders built on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["image_size", "read_image", "read_mask"]

_MODES = ("RGB", "L")
# ITU-R 601-2 luma, the weights PIL's own RGB -> L conversion uses
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# EXIF orientations 5-8 turn the picture by a quarter: width and height swap
_TRANSPOSED = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                  Image.DecompressionBombError)


def _bits_per_sample(img: Image.Image) -> int:
    """Bits per integer sample the file stores (PNG: at most 16; TIFF: its tag 258)."""
    if img.format == "PNG":
        return 16
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 258 in tags:
        value = tags[258]
        return int(value[0] if isinstance(value, tuple) else value)
    return 32


def _open_oriented(path: Path) -> tuple[Image.Image, int]:
    """Decode ``path`` fully, with its EXIF orientation applied (the caller closes it).

    Returns the image and the bits per sample of the file (read before the orientation
    step, whose copy forgets the file format).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now so that a truncated file fails here, named
        bits = _bits_per_sample(img)
        oriented = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if oriented is not img:
        img.close()
    return oriented, bits


def _scaled(img: Image.Image, path: Path, bits: int) -> np.ndarray:
    """Pixels as float32 in [0, 1], (H, W) or (H, W, C), scaled by the type's true range."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode == "I":
        # PIL widens 16-bit PNGs (and 8/16-bit TIFFs) to 32-bit ints: the file says which
        array = np.asarray(img).astype(np.int64)
        if array.min(initial=0) < 0:
            raise ValueError(f"image {path} holds negative integer pixels (min {array.min()}); "
                             "expected unsigned intensities")
        return (array / float(2 ** bits - 1)).astype(np.float32)
    if mode == "F":
        array = np.asarray(img, dtype=np.float32)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if not np.isfinite(array).all() or low < 0.0 or high > 1.0:
            raise ValueError(f"floating-point image {path} has values in [{low}, {high}]; expected "
                             "finite values in [0, 1] (a float file carries no range to scale by)")
        return array
    if mode in ("1", "L", "RGB"):
        return np.asarray(img, dtype=np.float32) / 255.0
    # palette, alpha, CMYK, YCbCr, LAB...: PIL's own 8-bit conversion is exact for these
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Read an image file as the user sees it.

    The EXIF orientation is applied; 8-, 16- and 32-bit integer images are divided by their
    type's maximum (255, 65 535, 2³² − 1), so nothing is clipped; a floating-point image must
    already lie in [0, 1]. Grey images asked for as ``"RGB"`` are replicated on three
    channels; colour images asked for as ``"L"`` are reduced to ITU-R 601-2 luma (what PIL's
    ``convert("L")`` computes), at full precision for high-bit-depth files. An alpha channel
    is dropped.

    Args:
        path: PNG, JPEG, BMP, TIFF or any file PIL decodes.
        mode: ``"RGB"`` (three channels) or ``"L"`` (one channel, luminance).

    Returns:
        (H, W, C) float32 in [0, 1], C = 3 for ``"RGB"`` and 1 for ``"L"``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``mode`` is not ``"RGB"`` or ``"L"``, or the file cannot be decoded or
            holds values outside what its type allows (the message names the file).
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: expected 'RGB' or 'L'")
    path = Path(path)
    img, bits = _open_oriented(path)
    try:
        if img.mode in ("1", "L", "RGB", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV",
                        "RGBX", "La", "RGBa"):
            # 8-bit images: PIL's conversions are the reference (and bit-exact with earlier reads)
            array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
        else:
            array = _scaled(img, path, bits)
    finally:
        img.close()
    if array.ndim == 2:
        array = array[:, :, None]
    if mode == "RGB" and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif mode == "L" and array.shape[2] >= 3:
        array = (array[:, :, :3] @ _LUMA)[:, :, None]
    elif array.shape[2] not in (1, 3):
        array = array[:, :, :3] if mode == "RGB" else array[:, :, :1]
    return np.ascontiguousarray(array, dtype=np.float32)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a defect mask: every non-zero pixel is a defect.

    The rule is the same whatever the file stores (0/1, 0/255, 16-bit, palette or colour
    masks: a pixel is a defect when any of its colour channels is non-zero; alpha is
    ignored). The EXIF orientation is applied exactly as :func:`read_image` applies it, so
    mask and image stay aligned.

    Args:
        path: the mask file.

    Returns:
        (H, W) bool, True on defect pixels.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be decoded (the message names it).
    """
    path = Path(path)
    img, _ = _open_oriented(path)
    try:
        if img.mode == "P":
            # a palette index is not an intensity: decide on the colours it stands for
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        array = np.asarray(img)
        if img.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
            array = array[..., :-1]
    finally:
        img.close()
    if array.ndim == 3:
        return np.ascontiguousarray((array != 0).any(axis=2))
    return np.ascontiguousarray(array != 0)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as the user sees it (EXIF orientation applied), read from
    its header only.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be decoded (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return (height, width) if orientation in _TRANSPOSED else (width, height)
