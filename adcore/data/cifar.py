"""CIFAR-10 one-vs-rest (Krizhevsky, 2009), the image-level benchmark of Table 3 of the VQ-VAE paper.

A model is trained on the 5000 training images of one class (the "normal" class) and tested
on all 10 000 test images, the other nine classes being anomalous (Section 3.4). Two
layouts are read, both offline:

- the official Python release, as torchvision downloads it:
  ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}``;
- an image folder: ``<root>/{train,test}/<class name>/*.png``.

The official files are pickles; they are read with an unpickler that only accepts the
NumPy arrays, lists, dicts and strings such a file holds, so a forged file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from adcore.data.mvtec import IMAGE_SUFFIXES, read_image

__all__ = ["CIFAR10_CLASSES", "CIFAR10OneVsRest", "read_cifar10"]

CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck")
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_LAYOUT = ("<root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (the official Python release) "
           "or <root>/{train,test}/<class>/*.png")
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only NumPy arrays and plain containers (what the CIFAR batches hold)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch "
                                     "file (only NumPy arrays are expected)")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"cannot read the CIFAR-10 batch {path}: {err}") from err
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: it has keys {sorted(batch)}, "
                         "expected 'data' and 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data has shape {data.shape}; expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch["labels"], dtype=np.int64)


def read_cifar10(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a CIFAR-10 split.

    Args:
        root: a folder holding ``cifar-10-batches-py`` (or that folder itself), or an image
            folder ``{train,test}/<class>/*.png``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images (N, 3, 32, 32) uint8, labels (N,) int64 class indices, sources)`` where
        sources names each image's file (``file#index`` for the batch files).

    Raises:
        FileNotFoundError: neither layout is present (the message says what was expected).
        ValueError: a bad split, an unknown class folder, or an unreadable file.
    """
    if split not in _BATCHES:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    root = Path(root)
    batches_dir = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if batches_dir.is_dir():
        images, labels, sources = [], [], []
        for name in _BATCHES[split]:
            path = batches_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"missing CIFAR-10 batch {path}; expected {_LAYOUT}")
            data, lab = _read_batch(path)
            images.append(data)
            labels.append(lab)
            sources += [f"{path}#{i}" for i in range(len(lab))]
        return (torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                sources)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no CIFAR-10 data under {root}: found neither {batches_dir} nor "
                                f"{split_dir}; expected {_LAYOUT}")
    tensors, labels, sources = [], [], []
    for folder in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        if folder.name not in CIFAR10_CLASSES:
            raise ValueError(f"unknown CIFAR-10 class folder {folder}; expected one of "
                             f"{', '.join(CIFAR10_CLASSES)}")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            image = read_image(path, None, channels=3)
            if image.shape != (3, 32, 32):
                raise ValueError(f"{path} is {image.shape[2]}x{image.shape[1]}; CIFAR-10 images "
                                 "are 32x32")
            tensors.append((image * 255).round().to(torch.uint8))
            labels.append(CIFAR10_CLASSES.index(folder.name))
            sources.append(str(path))
    if not tensors:
        raise ValueError(f"no images in {split_dir}; expected {_LAYOUT}")
    return torch.stack(tensors), torch.tensor(labels, dtype=torch.int64), sources


def _class_index(normal_class: int | str) -> int:
    if isinstance(normal_class, str):
        if normal_class not in CIFAR10_CLASSES:
            raise ValueError(f"unknown CIFAR-10 class {normal_class!r}; expected one of "
                             f"{', '.join(CIFAR10_CLASSES)} (or an index 0-9)")
        return CIFAR10_CLASSES.index(normal_class)
    if not 0 <= int(normal_class) < 10:
        raise ValueError(f"CIFAR-10 class index {normal_class} out of range; expected 0-9")
    return int(normal_class)


class CIFAR10OneVsRest(Dataset):
    """CIFAR-10 one-vs-rest: one class is normal, the nine others anomalous.

    Items follow :class:`adcore.data.MVTecAD`: ``image`` (3, 32, 32) float in [0, 1],
    ``mask`` (1, 32, 32) zeros (image-level task), ``label`` (0 normal, 1 anomalous),
    ``defect`` (the image's class name) and ``path``.

    Args:
        root: see :func:`read_cifar10`.
        normal_class: class name (``"airplane"`` ...) or index 0–9.
        split: ``"train"`` (the normal class only) or ``"test"`` (all test images).

    Raises:
        ValueError: an unknown class (the message lists them) or split.
        FileNotFoundError: the data is absent.
    """

    def __init__(self, root: str | os.PathLike, normal_class: int | str = "airplane",
                 split: str = "train") -> None:
        self.normal_class = _class_index(normal_class)
        self.split = split
        images, classes, sources = read_cifar10(root, split)
        if split == "train":
            keep = classes == self.normal_class
            images, classes = images[keep], classes[keep]
            sources = [s for s, k in zip(sources, keep.tolist()) if k]
            if len(classes) == 0:
                raise ValueError(f"no training image of class "
                                 f"{CIFAR10_CLASSES[self.normal_class]!r} under {root}")
        self.images, self.classes, self.sources = images, classes, sources

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[int]:
        """0 for the normal class, 1 for the others."""
        return (self.classes != self.normal_class).long().tolist()

    def __getitem__(self, index: int) -> dict[str, Any]:
        cls = int(self.classes[index])
        return {"image": self.images[index].float() / 255,
                "mask": torch.zeros(1, 32, 32),
                "label": int(cls != self.normal_class),
                "defect": CIFAR10_CLASSES[cls],
                "path": self.sources[index]}
