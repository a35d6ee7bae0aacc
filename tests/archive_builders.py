"""Small archives built by the tests (regular, and hostile ones), never committed as files."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path


def tar_archive(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    """A tar archive of regular files ``name -> content``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def zip_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A zip archive (stored) of regular files ``name -> content``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def hostile_tar(path: Path, entries: list[tuple[str, str, object]]) -> Path:
    """A tar of raw entries ``(kind, name, payload)``: kind is ``file`` (payload bytes), ``dir``,
    ``sym`` or ``hard`` (payload: the link target), ``fifo`` or ``chr``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
             "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}
    with tarfile.open(path, "w") as tf:
        for kind, name, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = bytes(payload)  # type: ignore[arg-type]
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = kinds[kind]
            if kind in ("sym", "hard"):
                info.linkname = str(payload)
            tf.addfile(info)
    return path
