"""Small runtime helpers shared by every room: device choice, fast mode, seeding, atomic files.

These are the only process-wide settings of the package, and each one is read from the
environment at call time (never cached), so a notebook can change them between cells:

- ``ADCORE_DEVICE``: force a device (``cpu``, ``cuda``, ``cuda:1``); default ``cuda`` when
  available, else ``cpu``.
- ``ADCORE_FAST=1``: the CI-sized mode of the chapters (smaller images, data and epochs).
- ``ADCORE_DATA``: the data root (see :func:`adcore.data.data_root`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "default_device",
    "fast_mode",
    "seed_everything",
    "atomic_path",
    "atomic_torch_save",
]


def default_device() -> torch.device:
    """The device chapters and the runner use: ``ADCORE_DEVICE`` if set, else CUDA when present.

    Raises:
        ValueError: if ``ADCORE_DEVICE`` names a device torch does not understand, or CUDA
            is requested on a machine without it.
    """
    name = os.environ.get("ADCORE_DEVICE", "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"ADCORE_DEVICE={name!r} is not a torch device; expected e.g. 'cpu', 'cuda' or 'cuda:0'"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ADCORE_DEVICE={name!r} asks for CUDA but torch sees no CUDA device")
    return device


def fast_mode() -> bool:
    """True when ``ADCORE_FAST=1``: chapters and the runner shrink data, image size and epochs."""
    return os.environ.get("ADCORE_FAST", "") == "1"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- third-party code draws from the legacy global state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    A crash while writing never leaves a half-written file under the final name. With
    ``overwrite=False`` the file is published by a hard link (``os.link``), which fails if
    ``path`` exists at that moment: a file another writer created while this one was being
    written is never replaced (a check-then-rename would replace it).

    Args:
        path: the final file name.
        overwrite: if False and ``path`` exists (before or after the block), raise instead
            of replacing it.

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
    """
    final = Path(path)
    if not overwrite and final.exists():
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, final)
        else:
            _publish_no_clobber(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


#: errors of ``os.link`` meaning "this file system has no hard links", not "the name is taken"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _publish_no_clobber(tmp: Path, final: Path) -> None:
    """Give ``tmp``'s content the name ``final`` unless that name exists; never replace it."""
    try:
        os.link(tmp, final)  # atomic, and fails with EEXIST if the name was taken meanwhile
        return
    except FileExistsError:
        raise FileExistsError(f"{final} was created by another writer while this one was "
                              "writing; it was kept, nothing was replaced") from None
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
    # A file system without hard links (some network and FAT mounts): an exclusive create
    # still never replaces another file, though a crash during the copy leaves a partial one.
    try:
        with open(final, "xb") as out, open(tmp, "rb") as src:
            shutil.copyfileobj(src, out)
    except FileExistsError:
        raise FileExistsError(f"{final} was created by another writer while this one was "
                              "writing; it was kept, nothing was replaced") from None


def atomic_torch_save(obj: object, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """``torch.save`` through :func:`atomic_path`; returns the final path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    return Path(path)
