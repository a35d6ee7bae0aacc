"""Synthetic anomalies: real defects cut from one data set, pasted into healthy images by Poisson editing.

The civil-engineering paper (``papers/003``, Sec. 2.2) makes realistic training anomalies by
pasting "the part of an image of another data set that corresponds to the anomaly" into each
healthy training image with Poisson image editing (its Eq. 5–6, :mod:`adcore.poisson`):
DeepCrack cracks into Crack500, CODEBRIM spalling into bridge images. This module is that
generator, seeded and batched:

1. a defect source (an image and its defect mask, :class:`DefectSource`) is cropped to the
   defect (optionally to a random window of it, for sources larger than the targets);
2. it is scaled (log-uniformly), rotated and mirrored at random;
3. it is placed at a random position, optionally with its centre on a foreground region
   (objects), shrunk if needed so that it fits the target;
4. the region Ω = the defect's mask grown by ``blend_margin`` pixels is Poisson-blended
   (:func:`adcore.poisson.poisson_blend`, the source's gradient as guidance, as the paper);
5. the augmented images come back with their exact defect masks (the warped source mask).

Sources: any image + mask pairs (:func:`defect_source`), the anomalous items of a data set
such as :class:`adcore.data.MVTecAD` (:func:`sources_from_dataset`), the real cracks of
``../shared/data`` (:func:`crack_sources`) and the embedded synthetic defects
(:func:`synthetic_sources`). Chapter 7 (``book/07_poisson``) shows the generator at work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adcore.data.synthetic import SYNTHETIC_CATEGORIES, sample_image
from adcore.poisson import poisson_blend

__all__ = [
    "AnomalySynthesizer",
    "DefectSource",
    "SyntheticAnomalies",
    "crack_sources",
    "defect_source",
    "sources_from_dataset",
    "synthetic_sources",
]

#: attempts to redraw an item whose warped defect vanished (a thin defect shrunk below a pixel)
_MAX_REDRAWS = 10


@dataclass(frozen=True)
class DefectSource:
    """A defect to paste: its image and mask, cropped to the defect plus a margin.

    Attributes:
        image: (C, h, w) float32 in [0, 1].
        mask: (h, w) bool, the defect's pixels (at least one).
        name: where it comes from (a file name, ``"synthetic/crack/3"``...).
    """

    image: Tensor
    mask: Tensor
    name: str = ""


def _as_chw(image: Any, name: str) -> Tensor:
    if isinstance(image, np.ndarray):
        # numpy images are (H, W) or (H, W, C), as PIL and adcore.data.sample_image give them
        array = image if image.ndim == 2 else np.moveaxis(image, -1, 0)
        image = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, Tensor):
        raise TypeError(f"source {name!r}: image must be a torch.Tensor or numpy array, got "
                        f"{type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"source {name!r}: image has shape {tuple(image.shape)} and dtype "
                         f"{image.dtype}; expected a float (C, H, W) tensor (or (H, W, C) array)")
    return image.float()


def defect_source(image: Any, mask: Any, name: str = "", margin: int = 6) -> DefectSource:
    """Validate a defect image and mask, and crop them to the defect plus ``margin`` pixels.

    Args:
        image: (C, H, W) float tensor, or (H, W, C) / (H, W) float numpy array, in [0, 1].
        mask: (H, W) or (1, H, W), bool or {0, 1}; the defect's pixels.
        name: a label for messages.
        margin: healthy pixels kept around the defect (the blend needs a ring of them).

    Raises:
        ValueError: an empty mask, a mask of another size than its image, a non-binary mask,
            or non-finite pixels.
    """
    image = _as_chw(image, name)
    mask = torch.as_tensor(np.asarray(mask)) if isinstance(mask, np.ndarray) else mask
    if not isinstance(mask, Tensor):
        raise TypeError(f"source {name!r}: mask must be a tensor or array, got "
                        f"{type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"source {name!r}: mask has shape {tuple(mask.shape)} but its image is "
                         f"{tuple(image.shape[1:])} (H, W); expected equal sizes")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"source {name!r}: mask must hold 0 or 1 only (or be bool)")
        mask = mask != 0
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"source {name!r}: image holds non-finite pixels (NaN or inf); "
                         "expected finite values in [0, 1]")
    if not bool(mask.any()):
        raise ValueError(f"source {name!r} has an empty mask: there is no defect to paste")
    # A defect touching its image's border still needs its ring of healthy pixels (the blend's
    # boundary): pad by edge replication so that the crop always has ``margin`` pixels around.
    if margin > 0:
        image = F.pad(image[None], (margin,) * 4, mode="replicate")[0]
        mask = F.pad(mask, (margin,) * 4)
    ys, xs = mask.nonzero().unbind(1)
    top, bottom = int(ys.min()) - margin, int(ys.max()) + margin + 1
    left, right = int(xs.min()) - margin, int(xs.max()) + margin + 1
    return DefectSource(image[:, top:bottom, left:right].contiguous(),
                        mask[top:bottom, left:right].contiguous(), name)


def sources_from_dataset(dataset: Iterable[dict[str, Any]], limit: int | None = None,
                         margin: int = 6) -> list[DefectSource]:
    """The anomalous items (non-empty ``mask``) of a data set as defect sources.

    Args:
        dataset: items as dicts with ``image`` (C, H, W) and ``mask`` (1, H, W), such as
            :class:`adcore.data.MVTecAD` (test split) or :class:`adcore.data.cracks.CrackTiles`.
        limit: keep at most this many.
        margin: as :func:`defect_source`.
    """
    sources = []
    for index, item in enumerate(dataset):
        if limit is not None and len(sources) >= limit:
            break
        if bool(torch.as_tensor(item["mask"]).any()):
            name = str(item.get("path", f"item {index}"))
            sources.append(defect_source(item["image"], item["mask"], name, margin))
    return sources


def synthetic_sources(category: str = "concrete", defects: Sequence[str] | None = None,
                      count: int = 16, image_size: int = 256, seed: int = 0,
                      margin: int = 6) -> list[DefectSource]:
    """Defects of the embedded synthetic data set (:func:`adcore.data.sample_image`).

    Args:
        category: a synthetic category; ``defects`` default to its defect types.
        count: sources to make (cycling through the defect types).
        image_size, seed: of the generated images.
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(f"category={category!r}; expected one of {sorted(SYNTHETIC_CATEGORIES)}")
    kinds = tuple(defects) if defects else SYNTHETIC_CATEGORIES[category][1]
    sources = []
    for index in range(count):
        defect = kinds[index % len(kinds)]
        sample = sample_image(category, defect, image_size, seed=seed, index=index)
        sources.append(defect_source(sample.image, sample.mask,
                                     f"synthetic/{category}/{defect}/{index}", margin))
    return sources


def crack_sources(name: str = "deepcrack", root: str | os.PathLike | None = None,
                  scale: float | None = 0.5, limit: int | None = None,
                  margin: int = 6) -> list[DefectSource]:
    """Real cracks of a crack set (default: the DeepCrack subset of ``../shared/data``).

    Args:
        name: the set's folder under the crack root (:func:`adcore.data.cracks.crack_root`).
        root: the crack root (default: found as that function does).
        scale: resize factor for the source images (None: native size).
        limit: keep the first ``limit`` images.

    Raises:
        FileNotFoundError: no such crack set.
    """
    from adcore.data.cracks import LAYOUT, crack_pairs, crack_root, read_crack_pair

    base = crack_root() if root is None else root
    if base is None or not (os.path.isdir(os.path.join(base, name))):
        raise FileNotFoundError(f"no crack set {name!r} under {base or '../shared/data (absent)'}; "
                                f"set ADCORE_CRACKS to a folder holding {name}/ ({LAYOUT})")
    pairs = crack_pairs(os.path.join(base, name))[:limit]
    return [defect_source(*read_crack_pair(pair, scale), name=str(pair.image), margin=margin)
            for pair in pairs]


@dataclass
class SyntheticAnomalies:
    """A batch made by :class:`AnomalySynthesizer`.

    Attributes:
        images: (B, C, H, W), the augmented images (the targets' dtype and device).
        masks: (B, 1, H, W) bool, the pasted defects' exact pixels.
        regions: (B, 1, H, W) bool, the blended region Ω ⊇ masks; outside it the images are
            the targets, bit for bit.
        pasted: (B, C, H, W), the warped defect crops over the targets (what the blend's
            guidance field is taken from; a naive paste of it would show the seams).
        source_index: (B,) long, which source each defect came from.
        centres: (B, 2) float, the defect's centre (y, x) in pixels.
        scales, angles: (B,) float, the scale and the rotation (degrees, counter-clockwise).
        mirrored: (B,) bool, whether the defect was mirrored left-right.
        shrunk: how many defects were shrunk below their drawn scale to fit the target.
    """

    images: Tensor
    masks: Tensor
    regions: Tensor
    pasted: Tensor
    source_index: Tensor
    centres: Tensor
    scales: Tensor
    angles: Tensor
    mirrored: Tensor
    shrunk: int


class AnomalySynthesizer:
    """Paste random real defects into batches of healthy images (see the module docstring).

    Args:
        sources: the defects (:class:`DefectSource`), all with the same number of channels.
        scale: (low, high) scale factors, drawn log-uniformly.
        rotation: (low, high) angles in degrees, drawn uniformly (counter-clockwise as seen);
            a single number r means (−r, r).
        flip: probability of mirroring the defect left-right (an up-down mirror is that plus a
            half turn, which ``rotation`` covers).
        window: if set, a random window of at most ``window`` × ``window`` source pixels around
            a random defect pixel is cut first (for sources larger than the targets).
        blend_margin: Ω is the defect's mask grown by this many pixels (the seam lies in
            healthy texture, not on the defect's edge).
        blend: ``"poisson"`` (the paper) or ``"paste"`` (copy the defect's pixels, for
            comparison).
        guidance: ``"source"`` (the paper) or ``"mixed"``, as :func:`adcore.poisson.poisson_blend`.
        tol: the Poisson solver's tolerance.
        seed: seed of the generator's own random stream (advanced by every call).

    Raises:
        ValueError: no sources, sources with different channel counts, or bad settings.
    """

    def __init__(self, sources: Sequence[DefectSource], *,
                 scale: tuple[float, float] = (0.75, 1.25),
                 rotation: float | tuple[float, float] = 180.0, flip: float = 0.5,
                 window: int | None = None, blend_margin: int = 3,
                 blend: Literal["poisson", "paste"] = "poisson",
                 guidance: Literal["source", "mixed"] = "source", tol: float = 1e-4,
                 seed: int = 0) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("AnomalySynthesizer needs at least one defect source")
        channels = {s.image.shape[0] for s in self.sources}
        if len(channels) != 1:
            raise ValueError(f"sources have {sorted(channels)} channels; expected one count")
        self.channels = channels.pop()
        low, high = scale
        if not (0 < low <= high):
            raise ValueError(f"scale={scale}; expected 0 < low <= high")
        self.scale = (float(low), float(high))
        self.rotation = ((-float(rotation), float(rotation)) if isinstance(rotation, int | float)
                         else (float(rotation[0]), float(rotation[1])))
        if not 0 <= flip <= 1:
            raise ValueError(f"flip={flip}; expected a probability in [0, 1]")
        if window is not None and window < 4:
            raise ValueError(f"window={window}; expected at least 4 pixels or None")
        if blend not in ("poisson", "paste"):
            raise ValueError(f"blend={blend!r}; expected 'poisson' or 'paste'")
        if blend_margin < 1:
            raise ValueError(f"blend_margin={blend_margin}; expected at least 1 pixel")
        self.flip, self.window, self.blend_margin = float(flip), window, int(blend_margin)
        self.blend, self.guidance, self.tol = blend, guidance, tol
        self.generator = torch.Generator().manual_seed(seed)

    # ---- drawing one defect
    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def _crop(self, source: DefectSource) -> tuple[Tensor, Tensor]:
        if self.window is None:
            return source.image, source.mask
        height, width = source.mask.shape
        pixels = source.mask.nonzero()
        cy, cx = pixels[self._randint(len(pixels))].tolist()
        size_y, size_x = min(self.window, height), min(self.window, width)
        top = min(max(cy - size_y // 2, 0), height - size_y)
        left = min(max(cx - size_x // 2, 0), width - size_x)
        return (source.image[:, top:top + size_y, left:left + size_x],
                source.mask[top:top + size_y, left:left + size_x])

    def _placement(self, item: int, box_h: float, box_w: float, height: int, width: int,
                   region: Tensor | None) -> tuple[float, float]:
        """A random centre (y, x) that keeps the defect's box inside the image (and its centre
        on ``region``); boxes start on whole pixels, so right angles at scale 1 stay exact."""
        rows = height - math.ceil(box_h - 1e-6) + 1
        cols = width - math.ceil(box_w - 1e-6) + 1
        if region is None:
            top, left = self._randint(rows), self._randint(cols)
        else:
            offset_y, offset_x = round((box_h - 1) / 2), round((box_w - 1) / 2)
            allowed = region[offset_y:offset_y + rows, offset_x:offset_x + cols].flatten()
            candidates = allowed.nonzero()[:, 0]
            if len(candidates) == 0:
                raise ValueError(f"item {item}: the placement region (foreground) has zero area "
                                 f"where a {box_h:.0f}x{box_w:.0f} defect fits "
                                 f"({int(region.sum())} foreground pixels in all); expected some")
            top, left = divmod(int(candidates[self._randint(len(candidates))]), cols)
        return top + (box_h - 1) / 2, left + (box_w - 1) / 2

    def _draw(self, item: int, height: int, width: int, region: Tensor | None) -> dict[str, Any]:
        index = self._randint(len(self.sources))
        image, mask = self._crop(self.sources[index])
        crop_h, crop_w = mask.shape
        scale = math.exp(self._uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        angle = self._uniform(*self.rotation)
        mirrored = float(torch.rand((), generator=self.generator)) < self.flip
        cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
        extent_w, extent_h = cos * crop_w + sin * crop_h, sin * crop_w + cos * crop_h
        fit = min(width / extent_w, height / extent_h) * (1 - 1e-6)
        shrunk = scale > fit
        scale = min(scale, fit)
        centre = self._placement(item, scale * extent_h, scale * extent_w, height, width, region)
        return {"index": index, "image": image, "mask": mask, "scale": scale, "angle": angle,
                "mirrored": mirrored, "centre": centre, "shrunk": shrunk}

    # ---- the batch
    def _check(self, images: Tensor, foreground: Tensor | None) -> Tensor | None:
        if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images have shape {shape}; expected a float (B, C, H, W) tensor")
        batch, channels, height, width = images.shape
        if channels != self.channels:
            raise ValueError(f"the sources have {self.channels} channels but the images "
                             f"{channels}; expected the same")
        finite = torch.isfinite(images).flatten(1).all(1)
        if not bool(finite.all()):
            raise ValueError(f"images hold non-finite pixels in item "
                             f"{int((~finite).nonzero()[0, 0])}; expected finite values")
        low = self.scale[0]
        for source in self.sources:
            crop_h, crop_w = source.mask.shape
            if self.window is not None:
                crop_h, crop_w = min(crop_h, self.window), min(crop_w, self.window)
            if crop_h * low > height or crop_w * low > width:
                raise ValueError(f"defect {source.name!r} ({crop_h}x{crop_w} pixels with its "
                                 f"margin, × {low} at the smallest scale) is larger than the "
                                 f"target {(height, width)}; use a smaller scale or a window")
        if foreground is None:
            return None
        if (not isinstance(foreground, Tensor)
                or tuple(foreground.shape) != (batch, 1, height, width)):
            shape = tuple(foreground.shape) if isinstance(foreground, Tensor) else foreground
            raise ValueError(f"foreground has shape {shape}; expected {(batch, 1, height, width)}")
        return foreground.detach().to("cpu", torch.bool)[:, 0]

    def __call__(self, images: Tensor, foreground: Tensor | None = None) -> SyntheticAnomalies:
        """Paste one random defect into each image.

        Args:
            images: (B, C, H, W) float in [0, 1], the healthy targets (any device).
            foreground: (B, 1, H, W) bool, where defect centres may go (None: anywhere).

        Returns:
            :class:`SyntheticAnomalies`.

        Raises:
            ValueError: bad shapes, non-finite pixels, a defect larger than the targets even at
                the smallest scale, or an empty placement region.
        """
        regions_cpu = self._check(images, foreground)
        batch, _, height, width = images.shape
        draws = [self._draw(b, height, width, None if regions_cpu is None else regions_cpu[b])
                 for b in range(batch)]
        for _ in range(_MAX_REDRAWS + 1):
            warped_image, warped_mask, coverage = self._warp(draws, images)
            empty = (~warped_mask.flatten(1).any(1)).nonzero()[:, 0].tolist()
            if not empty:
                break
            for b in empty:
                draws[b] = self._draw(b, height, width,
                                      None if regions_cpu is None else regions_cpu[b])
        else:
            names = [self.sources[draws[b]["index"]].name for b in empty]
            raise ValueError(f"the defects {names} vanish when warped (thinner than a pixel at "
                             f"the drawn scales); use a larger scale or other sources")
        margin = self.blend_margin
        grown = F.max_pool2d(warped_mask.float(), 2 * margin + 1, 1, margin) > 0
        # Ω keeps a ring of warped source pixels around it, which its guidance field needs
        inner = ~(F.max_pool2d((~coverage).float(), 3, 1, 1) > 0)
        regions = grown & inner
        masks = warped_mask & regions
        lost = (~masks.flatten(1).any(1)).nonzero()[:, 0].tolist()
        if lost:  # never hand back an unchanged image labelled as anomalous
            names = [self.sources[draws[b]["index"]].name for b in lost]
            raise ValueError(f"the defects {names} left no pixel inside their blending region; "
                             "give them a larger margin (defect_source(margin=...))")
        source = torch.where(coverage, warped_image, images)
        if self.blend == "poisson":
            blended = poisson_blend(images, source, regions, guidance=self.guidance,
                                    tol=self.tol)
        else:
            blended = torch.where(masks, source, images)
        device = images.device
        return SyntheticAnomalies(
            images=blended, masks=masks, regions=regions if self.blend == "poisson" else masks,
            pasted=source,
            source_index=torch.tensor([d["index"] for d in draws], device=device),
            centres=torch.tensor([d["centre"] for d in draws], device=device),
            scales=torch.tensor([d["scale"] for d in draws], device=device),
            angles=torch.tensor([d["angle"] for d in draws], device=device),
            mirrored=torch.tensor([d["mirrored"] for d in draws], device=device),
            shrunk=sum(d["shrunk"] for d in draws))

    def _warp(self, draws: list[dict[str, Any]], images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Resample every drawn crop onto its target grid in one ``grid_sample``.

        Returns:
            image (B, C, H, W), defect mask (B, 1, H, W) bool, coverage (B, 1, H, W) bool
            (pixels fully inside the warped crop).
        """
        batch, channels, height, width = images.shape
        device, dtype = images.device, images.dtype
        pad_h = max(d["mask"].shape[0] for d in draws)
        pad_w = max(d["mask"].shape[1] for d in draws)
        stack = torch.zeros(batch, channels + 2, pad_h, pad_w)
        for b, d in enumerate(draws):
            crop_h, crop_w = d["mask"].shape
            stack[b, :channels, :crop_h, :crop_w] = d["image"]
            stack[b, channels, :crop_h, :crop_w] = d["mask"].float()
            stack[b, channels + 1, :crop_h, :crop_w] = 1.0
        params = torch.tensor([[d["centre"][0], d["centre"][1], d["scale"],
                                math.cos(math.radians(d["angle"])),
                                math.sin(math.radians(d["angle"])),
                                -1.0 if d["mirrored"] else 1.0,
                                (d["mask"].shape[0] - 1) / 2, (d["mask"].shape[1] - 1) / 2]
                               for d in draws], dtype=torch.float64)
        params = params.to(device=device, dtype=torch.float32)
        cy, cx, scale, cos, sin, mirror, crop_cy, crop_cx = (p[:, None, None]
                                                             for p in params.unbind(1))
        dy = torch.arange(height, device=device, dtype=torch.float32)[None, :, None] - cy
        dx = torch.arange(width, device=device, dtype=torch.float32)[None, None, :] - cx
        # the inverse map target -> crop: undo the scale, the rotation, then the mirror
        source_x = mirror * (cos * dx - sin * dy) / scale + crop_cx
        source_y = (sin * dx + cos * dy) / scale + crop_cy
        grid = torch.stack([(2 * source_x + 1) / pad_w - 1, (2 * source_y + 1) / pad_h - 1], -1)
        warped = F.grid_sample(stack.to(device), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        image = warped[:, :channels].clamp(0, 1).to(dtype)
        mask = warped[:, channels:channels + 1] >= 0.5
        coverage = warped[:, channels + 1:] >= 1 - 1e-4
        return image, mask, coverage
