"""The embedded synthetic data set: industrial-inspection-like images with exact defect masks.

Every chapter and test of the book runs on it, so nothing has to be downloaded. Images are
drawn from a seeded random generator (one independent stream per image, so a data set does
not depend on the order it is written in) and saved in the MVTec AD folder layout::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

so that :class:`adcore.data.MVTecAD` reads it exactly like the real MVTec AD.

Four categories, two textures and two objects (:data:`SYNTHETIC_CATEGORIES`), and five defect
types (:data:`DEFECT_TYPES`) of varied size and contrast. A defect only ever changes pixels
inside its mask (its soft edge is clipped to the mask), so the masks are exact. Chapter 1
(``book/01_data``) explains the generator with figures.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFECT_TYPES",
    "SYNTHETIC_CATEGORIES",
    "SyntheticSample",
    "make_synthetic_dataset",
    "render_defect",
    "render_normal",
    "sample_image",
]

DEFECT_TYPES: tuple[str, ...] = ("crack", "scratch", "hole", "stain", "missing")

#: category name -> (kind, defect types used in its test split)
SYNTHETIC_CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "concrete": ("texture", ("crack", "hole", "stain", "scratch")),
    "tile": ("texture", ("crack", "scratch", "stain", "missing")),
    "nut": ("object", ("scratch", "hole", "stain", "missing")),
    "screw": ("object", ("crack", "scratch", "stain", "missing")),
}

_MARKER = ".adcore_synthetic.json"
_FORMAT = 1


@dataclass
class SyntheticSample:
    """One generated image.

    Attributes:
        image: (H, W, 3) float32 in [0, 1].
        mask: (H, W) bool, True where the defect changed the image (all False if normal).
        foreground: (H, W) bool, the object (all True for textures).
        defect: ``"good"`` or one of :data:`DEFECT_TYPES`.
    """

    image: np.ndarray
    mask: np.ndarray
    foreground: np.ndarray
    defect: str


# --------------------------------------------------------------------------- textures
@functools.lru_cache(maxsize=16)
def _spectral_filter(size: int, beta: float) -> np.ndarray:
    """1/‖k‖^(β/2) on the half-spectrum of a real (size, size) field (the mean term set to 1)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    norm_k = np.sqrt(fy**2 + fx**2)
    norm_k[0, 0] = 1.0
    return (norm_k ** (-beta / 2)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(yy, xx)``, each (size, size) float32 (cached: read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _fbm(rng: np.random.Generator, size: int, beta: float = 2.0) -> np.ndarray:
    """Fractional Brownian noise by spectral synthesis; (size, size) float32 in [0, 1].

    White noise is filtered in the Fourier domain by 1/‖k‖^(β/2), so the power spectrum of
    the field falls off as ‖k‖^(−β) (chapter 1 derives and checks this).
    """
    noise = rng.standard_normal((size, size), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * _spectral_filter(size, beta), s=(size, size))
    field -= field.min()
    return (field / max(field.max(), 1e-8)).astype(np.float32)


def _concrete(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    base = 0.45 + 0.1 * rng.random()
    coarse = _fbm(rng, size, beta=2.6)
    fine = _fbm(rng, size, beta=1.2)
    grey = base + 0.22 * (coarse - 0.5) + 0.08 * (fine - 0.5)
    # Small dark pores, as in cast concrete.
    pores = ndimage.gaussian_filter(rng.random((size, size)), 1.0) > 0.5 + 0.06
    grey = np.where(pores & (rng.random((size, size)) < 0.3), grey * 0.8, grey)
    tint = np.array([1.0, 0.98, 0.94]) * (1 + 0.015 * rng.standard_normal(3))
    return np.clip(grey[..., None] * tint, 0, 1), np.ones((size, size), bool)


def _tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    period = size / 4
    offset = rng.uniform(0, period, 2)
    yy, xx = _grid(size)
    u, v = (xx + offset[0]) / period, (yy + offset[1]) / period
    grout_half = 0.045 + 0.01 * rng.random()
    grout = (np.abs(u - np.round(u)) < grout_half) | (np.abs(v - np.round(v)) < grout_half)
    tile_id = np.floor(u).astype(int) * 7 + np.floor(v).astype(int) * 13
    colour = np.array([0.72, 0.62, 0.50]) * (1 + 0.04 * rng.standard_normal(3))
    shade = 1 + 0.05 * np.sin(tile_id * 1.7 + rng.uniform(0, 6.28))
    speckle = 0.05 * (_fbm(rng, size, beta=1.0) - 0.5)
    image = colour * shade[..., None] + speckle[..., None]
    image[grout] = np.array([0.35, 0.34, 0.32]) + 0.03 * rng.standard_normal()
    return np.clip(image, 0, 1), np.ones((size, size), bool)


# --------------------------------------------------------------------------- objects
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    level = 0.12 + 0.05 * rng.random()
    noise = 0.015 * rng.standard_normal((size, size, 1), dtype=np.float32)
    return np.clip(np.full((size, size, 3), level, dtype=np.float32) + noise, 0, 1)


def _metal_shading(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
    yy, xx = _grid(size)
    gradient = 0.6 + (0.25 / size) * (np.cos(angle) * xx + np.sin(angle) * yy)
    brushed = 0.03 * (_fbm(rng, size, beta=1.5) - 0.5)
    return gradient + brushed


def _nut(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = _background(rng, size)
    centre = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    yy, xx = _grid(size)
    dx, dy = xx - centre[0], yy - centre[1]
    radius = size * (0.32 + 0.02 * rng.random())
    theta = np.arctan2(dy, dx) - rng.uniform(0, np.pi / 3)
    # Distance to the hexagon's edge along each direction (apothem / cos of the sector angle).
    sector = np.mod(theta, np.pi / 3) - np.pi / 6
    hexagon = np.hypot(dx, dy) * np.cos(sector) <= radius * np.cos(np.pi / 6)
    hole = np.hypot(dx, dy) <= radius * 0.42
    foreground = hexagon & ~hole
    shade = _metal_shading(rng, size, rng.uniform(0, 2 * np.pi))
    ring = np.hypot(dx, dy) <= radius * 0.55  # the chamfer around the thread
    metal = np.where(ring, shade * 0.85, shade)[..., None] * np.array([0.95, 0.95, 1.0])
    image = np.where(foreground[..., None], metal, image)
    return np.clip(image, 0, 1), foreground


def _screw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = _background(rng, size) + 0.55  # light background, like MVTec's screw
    angle = rng.uniform(0, np.pi)
    centre = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    yy, xx = _grid(size)
    along = (xx - centre[0]) * np.cos(angle) + (yy - centre[1]) * np.sin(angle)
    across = -(xx - centre[0]) * np.sin(angle) + (yy - centre[1]) * np.cos(angle)
    half_length, half_width = size * 0.33, size * 0.055
    shaft = (np.abs(along) <= half_length) & (np.abs(across) <= half_width * (1 - 0.6 * np.clip(
        (along - half_length * 0.75) / (half_length * 0.25), 0, 1)))
    head = np.hypot(along + half_length, across) <= size * 0.1
    foreground = shaft | head
    pitch = size * 0.035
    threads = 0.5 + 0.5 * np.cos(2 * np.pi * (along + 0.3 * across) / pitch)
    shade = _metal_shading(rng, size, angle) * (0.75 + 0.25 * np.cos(across / half_width * 1.2))
    metal = np.where(head, shade * 0.9, shade * (0.8 + 0.2 * threads))
    image = np.where(foreground[..., None], (metal * 0.75)[..., None], image)
    return np.clip(image, 0, 1), foreground


_RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "concrete": _concrete,
    "tile": _tile,
    "nut": _nut,
    "screw": _screw,
}


# --------------------------------------------------------------------------- defects
def _random_point(rng: np.random.Generator, region: np.ndarray, margin: int) -> np.ndarray:
    inner = region.copy()
    if margin:
        inner[:margin] = inner[-margin:] = False
        inner[:, :margin] = inner[:, -margin:] = False
    ys, xs = np.nonzero(inner if inner.any() else region)
    k = rng.integers(len(ys))
    return np.array([xs[k], ys[k]], dtype=np.float64)


def _polyline_mask(points: np.ndarray, size: int, width: float) -> np.ndarray:
    """Rasterise a polyline of (x, y) points with the given half-width in pixels."""
    line = np.zeros((size, size), bool)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, size - 1)
        ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, size - 1)
        line[ys, xs] = True
    if width <= 0.5:
        return line
    return ndimage.distance_transform_edt(~line) <= width


def _blob_mask(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float,
               roughness: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, np.pi)
    u = (xx - centre[0]) * np.cos(angle) + (yy - centre[1]) * np.sin(angle)
    v = (-(xx - centre[0]) * np.sin(angle) + (yy - centre[1]) * np.cos(angle)) / aspect
    wobble = roughness * (ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 40) * 6)
    return np.hypot(u, v) / radius + wobble <= 1.0


def _soft_alpha(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A soft edge that stays inside ``mask``: blurred mask, zero outside, 1 at the core."""
    if sigma <= 0:
        return mask.astype(np.float64)
    alpha = ndimage.gaussian_filter(mask.astype(np.float64), sigma) * mask
    return np.clip(alpha / max(alpha.max(), 1e-8), 0, 1)


def render_defect(rng: np.random.Generator, image: np.ndarray, foreground: np.ndarray,
                  defect: str, background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of type ``defect`` on a copy of ``image``.

    Args:
        rng: the random stream of this image.
        image: (H, W, 3) float in [0, 1], the normal image.
        foreground: (H, W) bool, where defects may be placed (the object, or everywhere).
        defect: one of :data:`DEFECT_TYPES`.
        background: (H, W, 3) colour that a ``missing`` part reveals (defaults to a dark grey).

    Returns:
        ``(defective_image, mask)`` with mask (H, W) bool, exactly the pixels that changed
        (pixels whose change would be invisible are still marked when inside the shape).

    Raises:
        ValueError: for an unknown defect name or an empty foreground.
    """
    if defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")
    if not foreground.any():
        raise ValueError("the foreground region is empty: nowhere to place a defect")
    size = image.shape[0]
    out = image.astype(np.float64).copy()
    contrast = rng.uniform(0.35, 1.0)  # varied, so some defects are subtle
    if defect == "crack":
        steps = int(rng.integers(12, 40))
        step_len = size * rng.uniform(0.008, 0.02)
        heading = rng.uniform(0, 2 * np.pi)
        points = [_random_point(rng, foreground, size // 6)]
        for _ in range(steps):
            heading += rng.normal(0, 0.45)
            points.append(points[-1] + step_len * np.array([np.cos(heading), np.sin(heading)]))
        mask = _polyline_mask(np.array(points), size, rng.uniform(0.6, 1.8))
        alpha = _soft_alpha(mask, 0.7)
        out *= 1 - (0.25 + 0.55 * contrast) * alpha[..., None]
    elif defect == "scratch":
        start = _random_point(rng, foreground, size // 8)
        angle = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.1, 0.35)
        bend = rng.normal(0, 0.08) * length
        t = np.linspace(0, 1, 12)[:, None]
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        points = start + length * t * direction + bend * (4 * t * (1 - t)) * normal
        mask = _polyline_mask(points, size, rng.uniform(0.5, 1.2))
        alpha = _soft_alpha(mask, 0.5)
        brighter = rng.random() < 0.7
        target = 1.0 if brighter else 0.0
        out += (target - out) * (0.3 + 0.5 * contrast) * alpha[..., None]
    elif defect == "hole":
        radius = size * rng.uniform(0.012, 0.06)
        centre = _random_point(rng, foreground, int(radius) + 2)
        mask = _blob_mask(rng, size, centre, radius, roughness=0.05)
        alpha = _soft_alpha(mask, radius / 4)
        out *= 1 - (0.4 + 0.5 * contrast) * alpha[..., None]
    elif defect == "stain":
        radius = size * rng.uniform(0.04, 0.12)
        centre = _random_point(rng, foreground, int(radius // 2))
        mask = _blob_mask(rng, size, centre, radius, roughness=0.25)
        alpha = _soft_alpha(mask, radius / 3)
        colour = np.clip(np.array([0.55, 0.35, 0.2]) + 0.15 * rng.standard_normal(3), 0, 1)
        out += (colour - out) * (0.15 + 0.45 * contrast) * alpha[..., None]
    else:  # missing: a chunk of the object (or of a tile) is gone, showing what lies beneath
        radius = size * rng.uniform(0.05, 0.1)
        centre = _random_point(rng, foreground, 0)
        # Push the chunk towards the outside so it bites the silhouette's edge when there is one.
        edge = ndimage.distance_transform_edt(foreground)
        if edge.max() < size / 2:  # an object: start on its boundary
            ys, xs = np.nonzero((edge > 0) & (edge <= 2))
            k = rng.integers(len(ys))
            centre = np.array([xs[k], ys[k]], dtype=np.float64)
        mask = _blob_mask(rng, size, centre, radius, roughness=0.1)
        beneath = background if background is not None else np.full_like(out, 0.3)
        alpha = _soft_alpha(mask, 1.0)
        out += (beneath - out) * alpha[..., None]
    mask &= foreground
    # The mask is exactly where the image was touched: clip everything outside it.
    out = np.where(mask[..., None], out, image)
    return np.clip(out, 0, 1).astype(np.float32), mask


def render_normal(rng: np.random.Generator, category: str,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect-free image of ``category``: ``(image (H, W, 3) float32, foreground (H, W) bool)``."""
    if category not in _RENDERERS:
        raise ValueError(f"unknown synthetic category {category!r}; "
                         f"expected one of {sorted(SYNTHETIC_CATEGORIES)}")
    image, foreground = _RENDERERS[category](rng, size)
    return image.astype(np.float32), foreground


def sample_image(category: str, defect: str = "good", image_size: int = 256, seed: int = 0,
                 index: int = 0) -> SyntheticSample:
    """Generate one image (the same one :func:`make_synthetic_dataset` writes for these values).

    Args:
        category: one of :data:`SYNTHETIC_CATEGORIES`.
        defect: ``"good"`` or a defect type of that category.
        image_size: side of the square image in pixels (≥ 32).
        seed: the data set seed.
        index: the image's index within its split and defect type.
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; "
                         f"expected one of {sorted(SYNTHETIC_CATEGORIES)}")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small; expected at least 32 pixels")
    allowed = SYNTHETIC_CATEGORIES[category][1]
    if defect != "good" and defect not in allowed:
        raise ValueError(f"category {category!r} has no defect {defect!r}; expected 'good' or one of {allowed}")
    stream = [seed, sorted(SYNTHETIC_CATEGORIES).index(category),
              0 if defect == "good" else 1 + DEFECT_TYPES.index(defect), index]
    rng = np.random.default_rng(stream)
    image, foreground = render_normal(rng, category, image_size)
    if defect == "good":
        return SyntheticSample(image, np.zeros(foreground.shape, bool), foreground, defect)
    if SYNTHETIC_CATEGORIES[category][0] == "object":
        # A missing part of an object shows the plain background (its colour at a corner).
        background = np.broadcast_to(image[0, 0], image.shape)
    else:
        background = np.full_like(image, 0.3)
    defective, mask = render_defect(rng, image, foreground, defect, background)
    return SyntheticSample(defective, mask, foreground, defect)


def _save_png(array: np.ndarray, path: Path) -> None:
    if array.dtype == bool:
        data = array.astype(np.uint8) * 255
    else:
        data = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(data).save(path, optimize=False, compress_level=1)


def _written_with(target: Path, settings: dict) -> bool:
    """True if ``target`` holds a complete synthetic set generated with ``settings``."""
    marker = target / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == settings


def make_synthetic_dataset(root: str | os.PathLike, category: str, n_train: int = 300,
                           n_test: int = 120, image_size: int = 256, seed: int = 0,
                           overwrite: bool = False) -> Path:
    """Write a synthetic data set in the MVTec AD layout and return ``<root>/<category>``.

    The test split holds about one third good images; the rest is shared evenly among the
    category's defect types. Writing is atomic: the folder appears complete or not at all.
    Calling it again with the same arguments returns the existing folder at once.

    Args:
        root: the data root (created if missing).
        category: one of :data:`SYNTHETIC_CATEGORIES` (``concrete``, ``tile``, ``nut``, ``screw``).
        n_train: number of defect-free training images (≥ 1).
        n_test: number of test images (≥ number of defect types + 1).
        image_size: side of the square images (≥ 32).
        seed: data set seed; the same seed gives the same pixels.
        overwrite: replace a folder this function wrote earlier with other settings.

    Returns:
        The category folder.

    Raises:
        ValueError: bad category, counts or size.
        FileExistsError: the folder exists and was not written by this function with the
            same settings (``overwrite=True`` replaces a synthetic one; a folder this
            function did not write is never replaced).
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; "
                         f"expected one of {sorted(SYNTHETIC_CATEGORIES)}")
    defects = SYNTHETIC_CATEGORIES[category][1]
    if n_train < 1:
        raise ValueError(f"n_train={n_train}: expected at least 1 training image")
    if n_test < len(defects) + 1:
        raise ValueError(f"n_test={n_test}: expected at least {len(defects) + 1} "
                         f"(one good image and one per defect type {defects})")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small; expected at least 32 pixels")
    settings = {"format": _FORMAT, "category": category, "n_train": n_train, "n_test": n_test,
                "image_size": image_size, "seed": seed}
    root = Path(root)
    target = root / category
    if target.exists():
        marker = target / _MARKER
        if not marker.is_file():
            raise FileExistsError(f"{target} exists and was not written by make_synthetic_dataset; "
                                  "choose another root (it is never overwritten)")
        existing = json.loads(marker.read_text())
        if existing == settings:
            return target
        if not overwrite:
            changed = {k: (existing.get(k), v) for k, v in settings.items() if existing.get(k) != v}
            raise FileExistsError(f"{target} holds a synthetic data set with other settings "
                                  f"(field: (existing, requested) = {changed}); "
                                  "pass overwrite=True to regenerate it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", dir=root))
    try:
        n_good_test = max(1, n_test // 3)
        counts = {"good": n_good_test}
        rest = n_test - n_good_test
        for i, defect in enumerate(defects):
            counts[defect] = rest // len(defects) + (1 if i < rest % len(defects) else 0)
        (tmp / "train" / "good").mkdir(parents=True)
        for i in range(n_train):
            sample = sample_image(category, "good", image_size, seed, index=i)
            _save_png(sample.image, tmp / "train" / "good" / f"{i:03d}.png")
        for defect, count in counts.items():
            (tmp / "test" / defect).mkdir(parents=True)
            if defect != "good":
                (tmp / "ground_truth" / defect).mkdir(parents=True)
            for i in range(count):
                # Test images use indices after the training ones, so no test image repeats one.
                sample = sample_image(category, defect, image_size, seed, index=n_train + i)
                _save_png(sample.image, tmp / "test" / defect / f"{i:03d}.png")
                if defect != "good":
                    _save_png(sample.mask, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
        (tmp / _MARKER).write_text(json.dumps(settings, indent=1))
        if _written_with(target, settings):
            return target  # a concurrent run (a sweep) wrote the same set meanwhile: keep it
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _written_with(target, settings):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
