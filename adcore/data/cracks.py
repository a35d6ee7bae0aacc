"""Real crack images and the crack protocol of the civil-engineering paper (``papers/003``, Sec. 3).

The paper splits each Crack500 image into 3×3 sub-images: sub-images without any crack pixel
are normal, the others anomalous; normal training crops come from the first 150 images of the
training split (613 crops) and test crops from its last 100 (321 normal, 527 cracked). Real
cracks from DeepCrack are then pasted into the healthy crops (:mod:`adcore.synth`) to train
the contrastive objectives.

This module makes that protocol a reusable builder over any folder of image/mask pairs::

    <set>/image/<name>.jpg|png     <set>/mask/<name>.png   (crack pixels non-zero)

and ships defaults for the two public sets kept in ``../shared/data`` (see its README):
CrackForest (``cfd``: 118 road images, 524 of their 1062 sub-images are crack-free) as the
target domain, standing in for Crack500, and the DeepCrack subset (``deepcrack``) as the
source of real defects. A ``crack500`` folder in the same layout uses the paper's 150 / 100
split. The data are found through :func:`crack_root`; nothing here needs them to import.

Chapter 7 (``book/07_poisson``) uses this module; chapter 9 reproduces the paper's table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adcore.data.imageio import image_size, read_mask
from adcore.data.mvtec import IMAGE_SUFFIXES, load_image
from adcore.data.root import shared_data_dir

__all__ = [
    "CRACK_SPLITS",
    "CrackPair",
    "CrackProtocol",
    "CrackTile",
    "CrackTiles",
    "build_crack_protocol",
    "count_tiles",
    "crack_datasets",
    "crack_pairs",
    "crack_root",
    "read_crack_pair",
    "tile_boxes",
]

ENV_VAR = "ADCORE_CRACKS"
LAYOUT = "<set>/image/<name>.jpg|png with <set>/mask/<name>.png (crack pixels non-zero)"
#: set name -> (first images for training, last images for testing). Crack500: the paper's
#: split of its 250 training images; the others keep the same 60 % / 40 % proportion.
CRACK_SPLITS: dict[str, tuple[int, int]] = {
    "crack500": (150, 100),
    "cfd": (70, 48),
    "deepcrack": (36, 24),
}


def crack_root() -> Path | None:
    """The folder holding the crack sets (``cfd/``, ``deepcrack/``, ...), or None when absent.

    ``ADCORE_CRACKS`` if set, else the project's shared data folder
    (:func:`adcore.data.shared_data_dir`: ``$ADCORE_SHARED_DATA`` or ``../shared/data``
    beside the repository).

    Raises:
        FileNotFoundError: ``ADCORE_CRACKS`` (or ``ADCORE_SHARED_DATA``) names a folder that
            does not exist.
    """
    explicit = os.environ.get(ENV_VAR, "").strip()
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={explicit!r} is not a folder; expected one holding "
                                    f"crack sets in the layout {LAYOUT}")
        return root
    return shared_data_dir()


@dataclass(frozen=True)
class CrackPair:
    """One image and its crack mask (file paths); ``name`` is their common stem."""

    image: Path
    mask: Path
    name: str


def crack_pairs(folder: str | os.PathLike) -> list[CrackPair]:
    """The image/mask pairs of one crack set, sorted by name.

    Args:
        folder: the set's folder, holding ``image/`` and ``mask/``.

    Raises:
        FileNotFoundError: a missing ``image/`` or ``mask/`` folder, or an image without mask.
        ValueError: no images at all.
    """
    folder = Path(folder)
    images_dir, masks_dir = folder / "image", folder / "mask"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise FileNotFoundError(f"{folder} should hold image/ and mask/ folders; expected the "
                                f"layout {LAYOUT}")
    images = sorted(p for p in images_dir.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise ValueError(f"{images_dir} holds no images (suffixes {', '.join(IMAGE_SUFFIXES)}); "
                         f"expected the layout {LAYOUT}")
    pairs = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"image {image} has no mask: expected {mask}")
        pairs.append(CrackPair(image, mask, image.stem))
    return pairs


def _read_mask(pair: CrackPair, size: tuple[int, int] | None = None) -> np.ndarray:
    """The pair's mask as (H, W) bool, checked against the image's size (``size`` = (W, H)).

    Non-zero pixels are cracks (:func:`adcore.data.imageio.read_mask`), so 0/1 and 0/255
    masks read alike; both files are read with their EXIF orientation applied.
    """
    image_wh = image_size(pair.image)
    mask = read_mask(pair.mask)
    mask_wh = (mask.shape[1], mask.shape[0])
    if mask_wh != image_wh:
        raise ValueError(f"mask {pair.mask} is {mask_wh[0]}x{mask_wh[1]} but its image "
                         f"{pair.image} is {image_wh[0]}x{image_wh[1]}; expected equal sizes")
    if size is not None:
        mask = np.array(Image.fromarray(mask).resize(size, Image.NEAREST))  # writable copy
    return mask


def read_crack_pair(pair: CrackPair, scale: float | None = None,
                    channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one pair.

    Args:
        pair: from :func:`crack_pairs`.
        scale: resize factor for both (bilinear for the image, nearest for the mask);
            None keeps the native size.
        channels: 3 (RGB) or 1 (grey).

    Returns:
        image (channels, H, W) float32 in [0, 1], mask (H, W) bool.

    Raises:
        ValueError: unreadable files, or a mask of another size than its image.
    """
    mask = _read_mask(pair)
    image = load_image(pair.image, None, channels)
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"scale={scale}: expected a positive factor")
        height, width = mask.shape
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        mask = _read_mask(pair, size)
        image = torch.nn.functional.interpolate(image[None], size=(size[1], size[0]),
                                                mode="bilinear", antialias=True,
                                                align_corners=False)[0].clamp(0, 1)
    return image, torch.from_numpy(np.ascontiguousarray(mask))


def tile_boxes(height: int, width: int, grid: int = 3) -> list[tuple[int, int, int, int]]:
    """The grid × grid sub-images of an image, row by row, as (top, bottom, left, right).

    Cuts fall at round(i · size / grid), so 320 rows give 107 + 106 + 107 (the split that
    gives CrackForest its 524 crack-free sub-images).
    """
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid={grid!r}; expected a positive int (3 in the paper)")
    if height < grid or width < grid:
        raise ValueError(f"an image of height x width {height}x{width} cannot be split by grid "
                         f"{grid}; expected at least {grid} pixels per side")
    rows = [(2 * i * height + grid) // (2 * grid) for i in range(grid + 1)]   # round half up
    cols = [(2 * i * width + grid) // (2 * grid) for i in range(grid + 1)]
    return [(rows[i], rows[i + 1], cols[j], cols[j + 1])
            for i in range(grid) for j in range(grid)]


@dataclass(frozen=True)
class CrackTile:
    """One sub-image: its pair, index (row-major in the grid), box and label (1 = crack)."""

    pair: CrackPair
    index: int
    box: tuple[int, int, int, int]
    label: int


def _tiles(pair: CrackPair, grid: int) -> list[CrackTile]:
    mask = _read_mask(pair)
    return [CrackTile(pair, k, box, int(mask[box[0]:box[1], box[2]:box[3]].any()))
            for k, box in enumerate(tile_boxes(*mask.shape, grid=grid))]


def count_tiles(pairs: Sequence[CrackPair], grid: int = 3) -> dict[str, int]:
    """How many sub-images of these pairs are crack-free (``normal``) and cracked."""
    labels = [tile.label for pair in pairs for tile in _tiles(pair, grid)]
    return {"normal": labels.count(0), "anomalous": labels.count(1)}


@dataclass(frozen=True)
class CrackProtocol:
    """The paper's crack protocol over one set: training and test sub-images.

    Attributes:
        train: the crack-free sub-images of the first ``n_train_images`` images.
        test: every sub-image of the last ``n_test_images`` images, labelled.
        n_train_images, n_test_images, grid: the settings.
    """

    train: tuple[CrackTile, ...]
    test: tuple[CrackTile, ...]
    n_train_images: int
    n_test_images: int
    grid: int

    def counts(self) -> dict[str, int]:
        """``train_normal``, ``test_normal``, ``test_anomalous``."""
        test_labels = [tile.label for tile in self.test]
        return {"train_normal": len(self.train), "test_normal": test_labels.count(0),
                "test_anomalous": test_labels.count(1)}


def build_crack_protocol(pairs: Sequence[CrackPair], n_train_images: int, n_test_images: int,
                         grid: int = 3) -> CrackProtocol:
    """Split images into grid × grid sub-images; train on the first images' normal ones.

    With Crack500's training images and (150, 100) this is the paper's protocol (it reports
    613 normal training crops and 321 + 527 test crops; 848 of the 900 test crops, so the
    authors dropped some, which this builder does not). Only masks are read here.

    Args:
        pairs: the set's pairs in their order (:func:`crack_pairs`).
        n_train_images: K, the first K images give the training sub-images.
        n_test_images: M, the last M images give the test sub-images (disjoint from the K).
        grid: sub-images per side (3 in the paper).

    Raises:
        ValueError: K or M below 1, K + M above the number of images, or a bad pair.
    """
    if not isinstance(n_train_images, int) or n_train_images < 1:
        raise ValueError(f"n_train_images={n_train_images!r}; expected a positive int")
    if not isinstance(n_test_images, int) or n_test_images < 1:
        raise ValueError(f"n_test_images={n_test_images!r}; expected a positive int")
    if n_train_images + n_test_images > len(pairs):
        raise ValueError(f"the set has {len(pairs)} images but the protocol asks for "
                         f"{n_train_images} + {n_test_images} (training + test); expected at "
                         "most as many")
    train = tuple(tile for pair in pairs[:n_train_images] for tile in _tiles(pair, grid)
                  if tile.label == 0)
    test = tuple(tile for pair in pairs[len(pairs) - n_test_images:]
                 for tile in _tiles(pair, grid))
    return CrackProtocol(train, test, n_train_images, n_test_images, grid)


class CrackTiles(Dataset):
    """Sub-images as a torch Dataset, with the items of :class:`adcore.data.MVTecAD`.

    Each item is a dict: ``image`` (C, S, S) float in [0, 1], ``mask`` (1, S, S) float in
    {0, 1}, ``label`` 0 or 1, ``defect`` (``"good"`` or ``"crack"``) and ``path``
    (``"<image file>#tile<k>"``). The crop is resized to S × S (bilinear with antialiasing
    for the image, nearest for the mask); ``image_size=None`` keeps the crop's own size.

    Args:
        tiles: e.g. ``protocol.train`` or ``protocol.test``.
        image_size: S, or None.
        channels: 3 (RGB) or 1 (grey).
        protocol: the protocol the tiles come from (kept for reference).
    """

    def __init__(self, tiles: Sequence[CrackTile], image_size: int | None = 256,
                 channels: int = 3, protocol: CrackProtocol | None = None) -> None:
        if image_size is not None and image_size < 8:
            raise ValueError(f"image_size={image_size}: expected at least 8 pixels or None")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: expected 1 (grey) or 3 (RGB)")
        self.tiles = list(tiles)
        self.image_size = image_size
        self.channels = channels
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def labels(self) -> list[int]:
        """Tile labels (0 normal, 1 cracked) without reading any file."""
        return [tile.label for tile in self.tiles]

    def __getitem__(self, index: int) -> dict[str, Any]:
        tile = self.tiles[index]
        image, mask = read_crack_pair(tile.pair, channels=self.channels)
        top, bottom, left, right = tile.box
        image = image[:, top:bottom, left:right]
        mask = mask[top:bottom, left:right].float()[None]
        if self.image_size is not None:
            size = (self.image_size, self.image_size)
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear",
                                                    antialias=True, align_corners=False)[0]
            image = image.clamp(0, 1)
            mask = torch.nn.functional.interpolate(mask[None], size=size, mode="nearest")[0]
        return {"image": image.contiguous(), "mask": mask, "label": tile.label,
                "defect": "crack" if tile.label else "good",
                "path": f"{tile.pair.image}#tile{tile.index}"}


def crack_datasets(target: str = "cfd", root: str | os.PathLike | None = None,
                   image_size: int | None = 256, channels: int = 3,
                   n_train_images: int | None = None, n_test_images: int | None = None,
                   grid: int = 3) -> tuple[CrackTiles, CrackTiles]:
    """The crack protocol's training and test sets for one target set.

    Args:
        target: the set's folder name under the root: ``"cfd"`` (default, the public stand-in
            for Crack500), ``"crack500"`` or ``"deepcrack"``.
        root: the folder of sets (default :func:`crack_root`).
        image_size, channels: as :class:`CrackTiles`.
        n_train_images, n_test_images: K and M (default :data:`CRACK_SPLITS`).
        grid: sub-images per side.

    Returns:
        (train, test) :class:`CrackTiles`; both keep the protocol as ``.protocol``.

    Raises:
        ValueError: an unknown target. FileNotFoundError: no crack data found.
    """
    if target not in CRACK_SPLITS:
        raise ValueError(f"target={target!r}; expected one of {sorted(CRACK_SPLITS)}")
    base = Path(root) if root is not None else crack_root()
    if base is None or not (base / target).is_dir():
        where = base / target if base is not None else "../shared/data (absent)"
        raise FileNotFoundError(f"no crack set {target!r} at {where}; set {ENV_VAR} to a folder "
                                f"holding {target}/ in the layout {LAYOUT}")
    pairs = crack_pairs(base / target)
    default_train, default_test = CRACK_SPLITS[target]
    protocol = build_crack_protocol(pairs, n_train_images or default_train,
                                    n_test_images or default_test, grid)
    return (CrackTiles(protocol.train, image_size, channels, protocol),
            CrackTiles(protocol.test, image_size, channels, protocol))
