"""UCSD Ped1 (Mahadevan et al., CVPR 2010), the video data set of Table 2 of the VQ-VAE paper.

Grey frames of pedestrians walking on a campus path; anomalies are whatever else moves
(bicycles, skaters, carts). The public release is laid out as::

    UCSDped1/Train/Train001/001.tif ... 200.tif        (34 clips of normal frames)
    UCSDped1/Test/Test001/001.tif ...                  (36 clips)
    UCSDped1/Test/Test001_gt/001.bmp ...               (pixel masks, for some test clips)

Following the paper (Section 3.3), frames are resized to 128×128 and the pixel-level
evaluation uses the test clips that have pixel masks. A frame's label is 1 when its mask has
an anomalous pixel. Chapter 5 (``book/05_vqvae_tables``) runs it when the data is present.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from adcore.data.mvtec import load_image, load_mask

__all__ = ["UCSDPed1", "find_ucsd_ped1"]

_LAYOUT = ("UCSDped1/Train/TrainNNN/*.tif, UCSDped1/Test/TestNNN/*.tif and pixel masks "
           "UCSDped1/Test/TestNNN_gt/*.bmp")
_FRAME_SUFFIXES = (".tif", ".tiff")
_MASK_SUFFIXES = (".bmp", ".png", ".tif", ".tiff")


def find_ucsd_ped1(root: str | os.PathLike) -> Path:
    """The ``UCSDped1`` folder under ``root`` (``root`` itself, ``root/UCSDped1`` or
    ``root/UCSD_Anomaly_Dataset.v1p2/UCSDped1``).

    Raises:
        FileNotFoundError: none of these holds ``Train`` and ``Test`` folders; the message
            lists the places looked at and the expected layout.
    """
    root = Path(root)
    candidates = [root, root / "UCSDped1", root / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped1"]
    for folder in candidates:
        if (folder / "Train").is_dir() and (folder / "Test").is_dir():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no UCSD Ped1 data under {root} (looked for Train/ and Test/ in "
                            f"{looked}); expected the layout {_LAYOUT}")


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    # The archive ships macOS metadata files ("._001.tif"): skip hidden files.
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in suffixes and not p.name.startswith("."))


class UCSDPed1(Dataset):
    """UCSD Ped1 frames, grey, resized (128×128 by default, as in the paper).

    Each item is a dict like :class:`adcore.data.MVTecAD`'s: ``image`` (1, H, W) float in
    [0, 1], ``mask`` (1, H, W) float in {0, 1} (zeros for training frames), ``label`` (0 or 1),
    ``defect`` (``"good"`` or ``"abnormal"``) and ``path``.

    Args:
        root: the ``UCSDped1`` folder or a folder above it (see :func:`find_ucsd_ped1`).
        split: ``"train"`` (all training clips) or ``"test"`` (the test clips with pixel masks).
        image_size: side of the square frames (None keeps 238×158).
        clips: restrict to these clip numbers (e.g. ``[1, 2]``); None takes all.

    Raises:
        FileNotFoundError: the folder, a split, or a frame's mask is missing (named).
        ValueError: a bad split, or no frames found.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int | None = 128,
                 clips: list[int] | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        self.root = find_ucsd_ped1(root)
        self.split = split
        self.image_size = image_size
        prefix = "Train" if split == "train" else "Test"
        split_dir = self.root / prefix
        pattern = re.compile(rf"^{prefix}(\d+)$")
        clip_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and pattern.match(d.name))  # hidden names never match
        if clips is not None:
            wanted = set(clips)
            clip_dirs = [d for d in clip_dirs if int(pattern.match(d.name).group(1)) in wanted]
        self.samples: list[tuple[Path, Path | None]] = []
        for clip in clip_dirs:
            gt_dir = clip.with_name(clip.name + "_gt")
            if split == "test" and not gt_dir.is_dir():
                continue  # pixel evaluation needs masks: only the annotated clips are used
            masks = {}
            if split == "test":
                masks = {p.stem: p for p in _files(gt_dir, _MASK_SUFFIXES)}
            for frame in _files(clip, _FRAME_SUFFIXES):
                if split == "test" and frame.stem not in masks:
                    raise FileNotFoundError(f"no mask for the test frame {frame}: expected "
                                            f"{gt_dir / (frame.stem + '.bmp')}")
                self.samples.append((frame, masks.get(frame.stem)))
        if not self.samples:
            what = "clips with pixel masks (TestNNN_gt folders)" if split == "test" else "clips"
            raise ValueError(f"found no {split} frames in {split_dir} ({what}"
                             f"{'' if clips is None else f' among clips {clips}'}); expected the "
                             f"layout {_LAYOUT}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frame, mask_path = self.samples[index]
        image = load_image(frame, self.image_size, channels=1)
        if mask_path is None:
            mask = torch.zeros_like(image)
        else:
            mask = load_mask(mask_path, self.image_size)
            if mask.shape != image.shape:
                raise ValueError(f"mask {mask_path} has size {tuple(mask.shape[1:])} but its frame "
                                 f"{frame} has {tuple(image.shape[1:])}; expected equal sizes")
        label = int(bool(mask.any()))
        return {"image": image, "mask": mask, "label": label,
                "defect": "abnormal" if label else "good", "path": str(frame)}
