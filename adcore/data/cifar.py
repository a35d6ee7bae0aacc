"""CIFAR-10 one-vs-rest (Krizhevsky, 2009), the image-level benchmark of Table 3 of the VQ-VAE paper.

A model is trained on the 5000 training images of one class (the "normal" class) and tested
on all 10 000 test images, the other nine classes being anomalous (Section 3.4). Two
layouts are read:

- the official Python release, as torchvision downloads it:
  ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}``;
- image folders: ``<root>/{train,test}/<class name>/*.jpg|png`` (the JPEG re-encode of the
  project's shared data extracts to ``<root>/cifar10-jpeg/{train,test}/...``).

When ``root`` holds neither, the download registry (:mod:`adcore.data.download`) obtains
one: the shared JPEG archive (checksum-verified, extracted once under ``root``) by default,
the official release from its publisher when asked (``obtain="download"``). Decoding 60 000
JPEGs is slow, so a registry extraction keeps the decoded arrays as ``.npy`` files (keyed by
the archive's sha256, written atomically) beside the images; later reads load those.

The official files are pickles; they are read with an unpickler that only accepts the
NumPy arrays, lists, dicts and strings such a file holds, so a forged file cannot run code,
and their content is checked (one label in 0–9 per image).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from adcore.data.download import MARKER, ensure, local_candidates
from adcore.data.mvtec import IMAGE_SUFFIXES

__all__ = ["CIFAR10_CLASSES", "CIFAR10OneVsRest", "read_cifar10"]

CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck")
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_LAYOUT = ("<root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (the official Python release) "
           "or <root>/{train,test}/<class>/*.jpg|png with the ten class folders")
_OBTAIN = ("local", "download", "none")
_CACHE = ".adcore-cache"
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
    """One official batch file: (N, 3, 32, 32) uint8 images and (N,) int64 labels in 0-9."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as err:
        raise ValueError(f"cannot read the CIFAR-10 batch {path}: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}; "
                         "expected a dict with 'data' and 'labels'")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: it has keys {sorted(map(str, batch))}, "
                         "expected 'data' and 'labels'")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' is {kind}; expected a uint8 array (N, 3072)")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data has shape {data.shape}; expected (N, 3072)")
    try:
        labels = np.asarray(batch["labels"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: 'labels' is not a list of class indices ({err})") from err
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' has shape {labels.shape} and type {labels.dtype}; "
                         "expected one integer class index per image")
    if len(labels) != len(data):
        raise ValueError(f"{path} holds {len(data)} images but {len(labels)} labels; expected one "
                         "label per image")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels range over {labels.min()}..{labels.max()}; expected "
                         "class indices 0-9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_batches(batches_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, sources = [], [], []
    for name in _BATCHES[split]:
        path = batches_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"missing CIFAR-10 batch {path}; expected {_LAYOUT}")
        data, lab = _read_batch(path)
        images.append(data)
        labels.append(lab)
        sources += [f"{path}#{i}" for i in range(len(lab))]
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), sources


def _check_tree(folder: Path) -> None:
    """Refuse an image-folder tree whose splits or class folders are not CIFAR-10's."""
    for split in ("train", "test"):
        split_dir = folder / split
        if not split_dir.is_dir():
            raise ValueError(f"{folder} has no {split}/ folder; expected {_LAYOUT}")
        found = {d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
        unknown = sorted(found - set(CIFAR10_CLASSES))
        if unknown:
            raise ValueError(f"unknown CIFAR-10 class folder {split_dir / unknown[0]}; expected "
                             f"one of {', '.join(CIFAR10_CLASSES)}")
        missing = [c for c in CIFAR10_CLASSES if c not in found]
        if missing:
            raise ValueError(f"{split_dir} lacks the class folders {', '.join(missing)}; expected "
                             f"all ten ({', '.join(CIFAR10_CLASSES)})")


def _decode(path: Path) -> np.ndarray:
    """One 32x32 RGB image file as (32, 32, 3) uint8, exactly as stored (no conversion)."""
    try:
        with Image.open(path) as img:
            if img.size != (32, 32) or img.mode != "RGB":
                raise ValueError(f"{path} is a {img.size[0]}x{img.size[1]} {img.mode} image; "
                                 "CIFAR-10 images are 32x32 RGB")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read the CIFAR-10 image {path}: {err}") from err


def _cache_key(folder: Path) -> str | None:
    """The archive checksum a registry extraction records in its marker (None: no marker)."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    words = marker.read_text().split()
    return words[0].split(":")[-1][:16] if words else None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)


def _read_folders(folder: Path, split: str,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N, 32, 32, 3) uint8, (N,) int64, relative names ``class/file`` of one split."""
    _check_tree(folder)
    key = _cache_key(folder)
    cache = folder / _CACHE
    files = {kind: cache / f"{split}-{key}.{kind}.npy" for kind in ("names", "labels", "images")}
    if key is not None and all(f.is_file() for f in files.values()):
        try:
            names = np.load(files["names"], allow_pickle=False)
            labels = np.load(files["labels"], allow_pickle=False)
            images = np.load(files["images"], allow_pickle=False, mmap_mode="r")
            if (len(names) == len(labels) == len(images) and images.shape[1:] == (32, 32, 3)
                    and images.dtype == np.uint8 and labels.min(initial=0) >= 0
                    and labels.max(initial=0) <= 9):
                return images, labels.astype(np.int64), names.tolist()
        except (ValueError, OSError, EOFError):
            pass  # a damaged cache is decoded again and rewritten
    split_dir = folder / split
    names, labels, arrays = [], [], []
    bar = tqdm(total=None, desc=f"decode CIFAR-10 {split}", unit="img", disable=not progress)
    for index, name in enumerate(CIFAR10_CLASSES):
        paths = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not paths:
            raise ValueError(f"no images in {split_dir / name}; expected {_LAYOUT}")
        for path in paths:
            arrays.append(_decode(path))
            labels.append(index)
            names.append(f"{name}/{path.name}")
        bar.update(len(paths))
    bar.close()
    images, label_array = np.stack(arrays), np.asarray(labels, dtype=np.int64)
    if key is not None:
        try:
            cache.mkdir(exist_ok=True)
            # images last: their file's presence means the two others were written before
            _save_atomic(files["names"], np.asarray(names))
            _save_atomic(files["labels"], label_array)
            _save_atomic(files["images"], images)
        except OSError:
            pass  # a read-only folder: decode again next time
    return images, label_array, names


def _locate(root: Path, progress: bool) -> tuple[str, Path] | None:
    """("batches" | "folders", folder) of the CIFAR-10 data under ``root``, if present.

    A user's own layout is read as it is; the registry's folders (``cifar10-jpeg``,
    ``cifar-10-python``) only through :func:`adcore.data.download.ensure`, which returns a
    completed extraction and redoes (or refuses) an interrupted one, so a half-extracted
    folder is never read.
    """
    for batches in (root, root / "cifar-10-batches-py"):
        if batches.name == "cifar-10-batches-py" and batches.is_dir():
            return "batches", batches
    for folder in (root, root / "cifar10"):
        if (folder / "train").is_dir() or (folder / "test").is_dir():
            return "folders", folder
    if (root / "cifar10-jpeg").exists():
        return "folders", ensure("cifar10_jpeg", root, validate=_check_tree, progress=progress)
    if (root / "cifar-10-python").exists():
        return "batches", ensure("cifar10_python", root, progress=progress) / "cifar-10-batches-py"
    return None


def _obtain(root: Path, obtain: str, progress: bool) -> tuple[str, Path]:
    """Extract the shared JPEG archive (or download the official release) under ``root``."""
    wanted = f"no CIFAR-10 data under {root}; expected {_LAYOUT}"
    if obtain == "none":
        raise FileNotFoundError(wanted)
    if any(c.is_file() for c in local_candidates("cifar10_jpeg")):
        return "folders", ensure("cifar10_jpeg", root, validate=_check_tree, progress=progress)
    if obtain == "download":
        folder = ensure("cifar10_python", root, progress=progress)
        return "batches", folder / "cifar-10-batches-py"
    looked = ", ".join(str(c) for c in local_candidates("cifar10_jpeg")) or "no shared data folder"
    raise FileNotFoundError(f"{wanted}; no copy of the shared archive either (looked at: "
                            f"{looked}; set ADCORE_SHARED_DATA to the folder holding "
                            "cifar10/cifar10-jpeg.zip), or pass obtain='download' to fetch the "
                            "official release (163 MB)")


def read_cifar10(root: str | os.PathLike, split: str = "train", *, obtain: str = "local",
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a CIFAR-10 split.

    Args:
        root: a folder holding ``cifar-10-batches-py`` (or that folder itself), image folders
            ``{train,test}/<class>/*`` (directly, or as ``cifar10-jpeg/`` or ``cifar10/``), or
            nothing yet.
        split: ``"train"`` or ``"test"``.
        obtain: what to do when ``root`` holds no CIFAR-10: ``"local"`` extracts the project's
            shared JPEG archive under ``root`` (once, checksum-verified) when it is found;
            ``"download"`` also fetches the official release when it is not; ``"none"`` only
            reads.
        progress: show progress bars while obtaining and first decoding the data.

    Returns:
        ``(images (N, 3, 32, 32) uint8, labels (N,) int64 class indices, sources)`` where
        sources names each image's file (``file#index`` for the batch files).

    Raises:
        FileNotFoundError: no data and none could be obtained (the message says what was
            expected and where the archive was looked for).
        ValueError: a bad split or ``obtain``; a forged batch, a missing or unknown class
            folder, an image that is not 32x32 RGB (each names the file).
        ChecksumError, ArchiveError: the shared archive is damaged (named).
    """
    if split not in _BATCHES:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    if obtain not in _OBTAIN:
        raise ValueError(f"obtain={obtain!r}: expected one of {', '.join(_OBTAIN)}")
    root = Path(root)
    if root.is_file():
        raise ValueError(f"CIFAR-10 root {root} is a file; expected a folder ({_LAYOUT})")
    found = _locate(root, progress) or _obtain(root, obtain, progress)
    kind, folder = found
    if kind == "batches":
        return _read_batches(folder, split)
    images, labels, names = _read_folders(folder, split, progress)
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    split_dir = folder / split
    return tensor, torch.from_numpy(labels), [str(split_dir / n) for n in names]


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
        obtain: see :func:`read_cifar10`.

    Raises:
        ValueError: an unknown class (the message lists them) or split.
        FileNotFoundError: the data is absent.
    """

    def __init__(self, root: str | os.PathLike, normal_class: int | str = "airplane",
                 split: str = "train", *, obtain: str = "local") -> None:
        self.normal_class = _class_index(normal_class)
        self.split = split
        images, classes, sources = read_cifar10(root, split, obtain=obtain)
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
