"""The files ``score`` writes per image: the map as float32 TIFF, the mask and the overlay as PNG.

The overlay is drawn with NumPy and a matplotlib colour map, without a figure, so that it
costs a few milliseconds: the heat map is blended over the image with an opacity that grows
with the score (normal regions stay visible), and the outline of the thresholded region is
drawn in cyan. The colour scale is fixed by the calibration pixel scores (from their median
to their largest value), so overlays of different images compare.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
from scipy import ndimage

from adcore.runtime import atomic_path

__all__ = ["overlay_rgb", "write_map", "write_mask", "write_overlay"]

OUTLINE_RGB = np.array([0.0, 1.0, 1.0], dtype=np.float32)


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
    colours = matplotlib.colormaps["inferno"](level)[..., :3].astype(np.float32)
    alpha = (max_alpha * level)[..., None]
    out = image * (1.0 - alpha) + colours * alpha
    if mask.any():
        width = max(1, round(min(mask.shape) / 200))
        edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
        out[edge] = OUTLINE_RGB
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_map(path: str | os.PathLike, anomaly_map: np.ndarray) -> None:
    """(H, W) scores as a float32 TIFF (one sample per pixel), written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F").save(
            tmp, format="TIFF")


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """(H, W) bool as an 8-bit PNG, 0 or 255."""
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG",
                                                                     compress_level=1)


def write_overlay(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 as a PNG (fast compression: overlays are for looking at)."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG", compress_level=1)


def output_names(relative: list[Path]) -> list[str]:
    """File stems for the outputs: the relative path without suffix (``sub/a``), or with the
    suffix folded in (``a_jpg``) when two inputs differ only by it."""
    stems = [p.with_suffix("").as_posix() for p in relative]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else f"{stem}_{p.suffix.lstrip('.').lower()}"
            for stem, p in zip(stems, relative)]
