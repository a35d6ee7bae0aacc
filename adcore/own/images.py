"""A folder of a reader's images: found recursively, read, resized to the model's size.

Every file goes through :func:`adcore.data.imageio.read_image` (EXIF orientation applied,
16-bit scaled by its range). Images may be grey or colour and of any size: all are used as
RGB and resized to the model's square size S (bilinear, antialiased); :class:`FolderNotes`
collects what a user should hear once (a mix of grey and colour images, images much smaller
than S) instead of a line per file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adcore.data.imageio import read_image
from adcore.train.loop import progress

__all__ = ["IMAGE_SUFFIXES", "FolderImages", "FolderNotes", "find_images", "load_folder",
           "resize_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: an image whose shorter side is below this share of the model's size is "much smaller"
SMALL_SHARE = 0.5


def find_images(folder: str | os.PathLike, *, flag: str = "--train") -> list[Path]:
    """Image files under ``folder``, searched recursively, in sorted order (hidden files skipped).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: it holds no file with an image suffix.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: not a folder; expected a folder of images")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not found:
        raise ValueError(f"{flag} {folder}: no images found (searched recursively for "
                         f"{', '.join(IMAGE_SUFFIXES)})")
    return found


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (3, S, S) float tensor, bilinear with antialiasing."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
    return tensor[0].clamp(0, 1)


def model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (3, S, S) uint8: what the model sees of an image.

    ``fit`` keeps its images as 8-bit (memory) and ``score`` uses this too, so a held-back
    image scores exactly as it did when it set the threshold.
    """
    return (resize_image(image, size) * 255).round().to(torch.uint8)


@dataclass
class FolderNotes:
    """What is worth saying once about a folder: grey/colour mix and images much smaller than S."""

    size: int
    grey: int = 0
    colour: int = 0
    small: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, name: str, image: np.ndarray) -> None:
        """Record one image (H, W, 3) read as RGB; grey files have three equal channels."""
        is_grey = bool(np.array_equal(image[..., 0], image[..., 1])
                       and np.array_equal(image[..., 1], image[..., 2]))
        self.grey += is_grey
        self.colour += not is_grey
        height, width = image.shape[:2]
        if min(height, width) < SMALL_SHARE * self.size:
            self.small.append((name, height, width))

    def messages(self) -> list[str]:
        """One sentence per finding (empty when there is nothing to say)."""
        out = []
        if self.grey and self.colour:
            out.append(f"note: {self.grey} grey and {self.colour} colour images; all are used "
                       "as RGB (grey ones replicated to three channels)")
        if self.small:
            name, height, width = min(self.small, key=lambda item: min(item[1], item[2]))
            out.append(f"note: {len(self.small)} image(s) are much smaller than the model's "
                       f"{self.size}x{self.size} (smallest: {name}, {width}x{height}); they are "
                       "enlarged, which blurs them: fine defects may be missed (a smaller "
                       "--image-size suits them better)")
        return out


@dataclass
class FolderImages:
    """Images of a folder at the model's size.

    Attributes:
        images: (N, 3, S, S) uint8 of the readable files.
        paths: their files.
        failures: (file, error message) of the files that could not be read.
        notes: :class:`FolderNotes` of the readable files.
    """

    images: torch.Tensor
    paths: list[Path]
    failures: list[tuple[Path, str]]
    notes: FolderNotes


def load_folder(paths: Sequence[Path], size: int, *, root: Path | None = None,
                desc: str = "reading images") -> FolderImages:
    """Read and resize every file; unreadable ones are listed in ``failures``, not raised.

    Args:
        paths: image files (:func:`find_images`).
        size: S, the model's input side.
        root: names in notes are relative to it.
        desc: the progress bar's label.
    """
    notes = FolderNotes(size)
    kept: list[torch.Tensor] = []
    ok: list[Path] = []
    failures: list[tuple[Path, str]] = []
    for path in progress(paths, desc=desc):
        try:
            image = read_image(path, mode="RGB")
        except ValueError as err:
            failures.append((path, str(err)))
            continue
        notes.add(str(path.relative_to(root)) if root else path.name, image)
        kept.append(model_input(image, size))
        ok.append(path)
    images = torch.stack(kept) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return FolderImages(images, ok, failures, notes)
