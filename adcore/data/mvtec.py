"""Loaders for data in the MVTec AD folder layout (Bergmann et al., CVPR 2019 / IJCV 2021).

The layout, shared by the real MVTec AD and the embedded synthetic set::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

:class:`FolderDataset` reads one category folder; :class:`MVTecAD` finds the category under a
root and says which ones exist when it is missing. Chapter 1 (``book/01_data``) shows both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adcore.data.imageio import image_size as _native_size
from adcore.data.imageio import read_image, read_mask

__all__ = ["IMAGE_SUFFIXES", "MVTEC_CATEGORIES", "FolderDataset", "MVTecAD", "load_image", "load_mask"]

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUT = ("<category>/train/good/*.png, <category>/test/<defect>/*.png, "
          "<category>/ground_truth/<defect>/<name>_mask.png")


def _list_images(folder: Path) -> list[Path]:
    # hidden files (macOS "._name.png" metadata, editors' backups) are not images of the set
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders, without hidden ones (``.ipynb_checkpoints``, ``.DS_Store`` folders...)."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_image(path: str | os.PathLike, image_size: int | None = None,
               channels: int = 3) -> torch.Tensor:
    """Read an image file (through :func:`adcore.data.imageio.read_image`) as a tensor.

    Args:
        path: image file (PNG, JPEG, BMP, TIFF); EXIF orientation applied, 16-bit scaled.
        image_size: resize to (image_size, image_size) with antialiased bilinear filtering;
            None keeps the native size.
        channels: 3 (RGB; grey images are replicated) or 1 (luminance).

    Returns:
        (channels, H, W) float32 in [0, 1].

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be decoded (the message names it), or ``channels`` is
            not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: expected 1 (grey) or 3 (RGB)")
    array = read_image(path, "RGB" if channels == 3 else "L")
    image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if image_size is not None and image.shape[1:] != (image_size, image_size):
        # antialiased bilinear in float: PIL's filter (to ~1e-7), with no 8-bit rounding
        image = torch.nn.functional.interpolate(image[None], size=(image_size, image_size),
                                                mode="bilinear", antialias=True,
                                                align_corners=False)[0].clamp_(0.0, 1.0)
    return image


def load_mask(path: str | os.PathLike, image_size: int | None = None) -> torch.Tensor:
    """Read a mask (through :func:`adcore.data.imageio.read_mask`: non-zero is defect).

    Resizing uses nearest-neighbour sampling, so the mask stays binary.

    Returns:
        (1, H, W) float32 in {0, 1}.
    """
    mask = read_mask(path)
    if image_size is not None:
        mask = np.asarray(Image.fromarray(mask).resize((image_size, image_size), Image.NEAREST))
    return torch.from_numpy(mask.astype(np.float32))[None]


class FolderDataset(Dataset):
    """One category folder in the MVTec AD layout.

    Each item is a dict: ``image`` (C, H, W) float in [0, 1], ``mask`` (1, H, W) float in
    {0, 1} (zeros for good images), ``label`` 0 (good) or 1 (anomalous), ``defect`` (the
    sub-folder name, ``"good"`` for normal images) and ``path`` (str).

    Args:
        path: the category folder (``<root>/<category>``).
        split: ``"train"`` or ``"test"``.
        image_size: side of the square output (None keeps each file's size).
        channels: 3 for RGB, 1 for grey.

    Raises:
        FileNotFoundError: the folder or its split is missing; the message shows the layout.
        ValueError: an empty split, a bad split name, or a defect image without its mask.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 image_size: int | None = 256, channels: int = 3) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        if image_size is not None and image_size < 8:
            raise ValueError(f"image_size={image_size}: expected at least 8 pixels or None")
        self.path = Path(path)
        self.split = split
        self.image_size = image_size
        self.channels = channels
        if not self.path.is_dir():
            raise FileNotFoundError(f"no data set folder at {self.path}; expected the MVTec AD "
                                    f"layout {LAYOUT}")
        split_dir = self.path / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{self.path} has no '{split}' folder; expected the MVTec AD "
                                    f"layout {LAYOUT}")
        self.samples: list[tuple[Path, Path | None, str]] = []
        defects = [d.name for d in _visible_dirs(split_dir)]
        if split == "train" and defects != ["good"]:
            raise FileNotFoundError(f"{split_dir} should hold exactly one folder 'good', found "
                                    f"{defects or 'none'}; expected the layout {LAYOUT}")
        for defect in defects:
            for image_path in _list_images(split_dir / defect):
                mask_path = None
                if defect != "good":
                    mask_path = self.path / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                    if not mask_path.is_file():
                        raise FileNotFoundError(f"no mask for the anomalous image {image_path}: "
                                                f"expected {mask_path}")
                self.samples.append((image_path, mask_path, defect))
        if not self.samples:
            raise ValueError(f"the {split} split at {split_dir} holds no images "
                             f"(suffixes {', '.join(IMAGE_SUFFIXES)}); expected the layout {LAYOUT}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Image labels (0 good, 1 anomalous) without reading any file."""
        return [0 if defect == "good" else 1 for _, _, defect in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path, defect = self.samples[index]
        image = load_image(image_path, self.image_size, self.channels)
        if mask_path is None:
            mask = torch.zeros((1, *image.shape[1:]))
        else:
            if self.image_size is not None:
                # Resizing hides a size mismatch: compare the files' native sizes first.
                image_wh, mask_wh = _native_size(image_path), _native_size(mask_path)
                if image_wh != mask_wh:
                    raise ValueError(f"mask {mask_path} is {mask_wh[0]}x{mask_wh[1]} but its image "
                                     f"{image_path} is {image_wh[0]}x{image_wh[1]}; expected equal sizes")
            mask = load_mask(mask_path, self.image_size)
            if mask.shape[1:] != image.shape[1:]:
                raise ValueError(f"mask {mask_path} has size {tuple(mask.shape[1:])} but its image "
                                 f"{image_path} has {tuple(image.shape[1:])}; expected equal sizes")
        return {"image": image, "mask": mask, "label": 0 if defect == "good" else 1,
                "defect": defect, "path": str(image_path)}


class MVTecAD(FolderDataset):
    """MVTec AD (or any data set in its layout, such as the synthetic one) by root and category.

    Args:
        root: the folder holding one sub-folder per category.
        category: e.g. ``"tile"`` (MVTec AD) or ``"concrete"`` (synthetic).
        split, image_size, channels: as :class:`FolderDataset`.

    Raises:
        FileNotFoundError: the root is missing, or the category is not under it (the message
            lists the categories that are).
    """

    def __init__(self, root: str | os.PathLike, category: str, split: str = "train",
                 image_size: int | None = 256, channels: int = 3) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist; expected a folder holding "
                                    f"one folder per category in the layout {LAYOUT}")
        if not (root / category).is_dir():
            found = [d.name for d in _visible_dirs(root) if (d / "train").is_dir()]
            raise FileNotFoundError(f"category {category!r} not found under {root}; categories "
                                    f"there: {found or 'none'} (MVTec AD has {', '.join(MVTEC_CATEGORIES)})")
        self.category = category
        super().__init__(root / category, split=split, image_size=image_size, channels=channels)
