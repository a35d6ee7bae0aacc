"""The files ``score`` writes per image: the map as float32 TIFF, the mask and the overlay as PNG.

The overlay is drawn with NumPy and a matplotlib colour map, without a figure, so that it
costs a few milliseconds: the heat map is blended over the image with an opacity that grows
with the score (normal regions stay visible), and the outline of the thresholded region is
drawn in cyan. The colour scale is fixed by the calibration pixel scores (from their median
to their largest value), so overlays of different images compare.

Speed (``score`` writes three files per image; ``benchmarks/own_images.py``): the colour map's
256-entry table is looked up directly, with matplotlib's own binning rule, instead of calling
the colour map on every pixel; the PNG files are encoded here, every row unfiltered and the
stream deflated at zlib level 1, which is 2-3x faster than PIL's adaptive row filters for
images like these and no larger. Pixels are what PIL would have written, bit for bit.
"""

from __future__ import annotations

import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
from scipy import ndimage

from adcore.runtime import atomic_path

__all__ = ["encode_png", "heat_colours", "output_names", "overlay_rgb", "write_map", "write_mask",
           "write_overlay"]

OUTLINE_RGB = np.array([0.0, 1.0, 1.0], dtype=np.float32)


@lru_cache(maxsize=4)
def _colour_table(name: str) -> tuple[int, np.ndarray]:
    """A colour map's N and its (N + 1, 3) float32 table; the last row is its "bad" colour."""
    cmap = matplotlib.colormaps[name]
    table = np.concatenate([cmap(np.arange(cmap.N))[:, :3], [cmap.get_bad()[:3]]])
    return cmap.N, table.astype(np.float32)


def heat_colours(level: np.ndarray, name: str = "inferno") -> np.ndarray:
    """``matplotlib.colormaps[name](level)[..., :3]`` as float32, for ``level`` in [0, 1] or NaN.

    The bin of a level is matplotlib's: ``int(level * N)`` in the level's precision, with
    level 1 in the last bin and NaN given the "bad" colour.
    """
    n, table = _colour_table(name)
    scaled = level * np.float32(n) if level.dtype == np.float32 else level * n
    scaled[scaled == n] = n - 1
    bad = np.isnan(scaled)
    scaled[bad] = n
    return np.take(table, scaled.astype(np.intp), axis=0)


def overlay_rgb(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, vmin: float,
                vmax: float, max_alpha: float = 0.65) -> np.ndarray:
    """Heat map over an image, with the outline of ``mask``.

    Args:
        image: (H, W, 3) float in [0, 1].
        anomaly_map: (H, W) float scores.
        mask: (H, W) bool, the thresholded region.
        vmin, vmax: the colour scale (scores at or below ``vmin`` are transparent).
        max_alpha: the heat map's opacity at ``vmax``.

    Returns:
        (H, W, 3) uint8.
    """
    span = max(float(vmax) - float(vmin), 1e-12)
    level = np.clip((anomaly_map - vmin) / span, 0.0, 1.0).astype(np.float32)
    colours = heat_colours(level)
    alpha = (max_alpha * level)[..., None]
    out = image * (1.0 - alpha)
    colours *= alpha
    out += colours
    if mask.any():
        width = max(1, round(min(mask.shape) / 200))
        edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
        out[edge] = OUTLINE_RGB
    np.clip(out, 0, 1, out=out)
    out *= 255
    out += 0.5
    return out.astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit PNG file's bytes: rows unfiltered, deflated at zlib level 1.

    Args:
        pixels: (H, W) grey or (H, W, 3) RGB, uint8, H and W at least 1.

    Raises:
        ValueError: another type or shape.
    """
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3
                                                             and pixels.shape[2] == 3)):
        raise ValueError(f"PNG pixels of type {pixels.dtype} and shape {pixels.shape}: expected "
                         "uint8 (H, W) or (H, W, 3)")
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"PNG pixels of shape {pixels.shape}: expected at least one pixel")
    colour_type = 0 if pixels.ndim == 2 else 2
    # each row starts with its filter type, 0 (none)
    rows = np.zeros((height, 1 + pixels[0].size), np.uint8)
    rows[:, 1:] = pixels.reshape(height, -1)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + tag + body
                + struct.pack(">I", zlib.crc32(body, zlib.crc32(tag))))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.data, 1)) + chunk(b"IEND", b""))


def write_map(path: str | os.PathLike, anomaly_map: np.ndarray) -> None:
    """(H, W) scores as a float32 TIFF (one sample per pixel), written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F").save(
            tmp, format="TIFF")


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """(H, W) bool as an 8-bit PNG, 0 or 255."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(encode_png(mask.astype(np.uint8) * 255))


def write_overlay(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 as a PNG (fast compression: overlays are for looking at)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(encode_png(np.ascontiguousarray(rgb)))


def output_names(relative: list[Path]) -> list[str]:
    """File stems for the outputs: the relative path without suffix (``sub/a``), or with the
    suffix folded in (``a_jpg``) when two inputs differ only by it."""
    stems = [p.with_suffix("").as_posix() for p in relative]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else f"{stem}_{p.suffix.lstrip('.').lower()}"
            for stem, p in zip(stems, relative)]
