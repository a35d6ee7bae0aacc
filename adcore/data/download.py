"""Downloads: one registry of URL + sha256, streamed with a progress bar, verified, extracted safely.

Every public archive the book can fetch is a :class:`Resource` in :data:`REGISTRY`. A file
whose checksum does not match is deleted and reported; an archive member that would land
outside the target folder (``..``, an absolute path, a link pointing outside) is refused
before anything is extracted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from adcore.data.root import data_root

__all__ = [
    "REGISTRY",
    "ChecksumError",
    "Resource",
    "UnsafeArchiveError",
    "download",
    "fetch",
    "safe_extract",
    "sha256sum",
]


class ChecksumError(ValueError):
    """A downloaded file's sha256 differs from the registry's (the file has been deleted)."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target folder."""


@dataclass(frozen=True)
class Resource:
    """A downloadable archive.

    Attributes:
        name: registry key, also the folder the archive is extracted into.
        url: where to fetch it.
        sha256: expected checksum of the archive file.
        filename: the archive's file name.
        size_mb: approximate size, shown before a long download.
        licence: the terms under which it is distributed.
    """

    name: str
    url: str
    sha256: str
    filename: str
    size_mb: float = 0.0
    licence: str = ""


REGISTRY: dict[str, Resource] = {
    "mvtec_ad": Resource(
        name="mvtec_anomaly_detection",
        url=("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
             "420938113-1629952094/mvtec_anomaly_detection.tar.xz"),
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        filename="mvtec_anomaly_detection.tar.xz",
        size_mb=5000,
        licence="CC BY-NC-SA 4.0 (MVTec Software GmbH)",
    ),
}


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str | os.PathLike, sha256: str, *, timeout: float = 60.0,
          progress: bool = True) -> Path:
    """Stream ``url`` to ``dest`` and verify its sha256.

    An existing ``dest`` with the right checksum is reused. The download goes to a
    ``.part`` file renamed only after the checksum matched.

    Raises:
        ChecksumError: the checksum differs; the partial file is deleted.
        urllib.error.URLError: the server could not be reached.
    """
    dest = Path(dest)
    if dest.is_file() and sha256sum(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        actual = sha256sum(part)
        if actual != sha256:
            raise ChecksumError(f"checksum mismatch for {url}: got sha256 {actual}, expected "
                                f"{sha256}; the downloaded file was deleted")
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    return dest


def _check_member(name: str, target: Path, link: str | None = None) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise UnsafeArchiveError(f"archive member {name!r} would be written outside {target}; "
                                 "refusing to extract")
    resolved = (target / name).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"archive member {name!r} escapes {target}; refusing to extract")
    if link is not None:
        link_target = (resolved.parent / link).resolve()
        if PurePosixPath(link).is_absolute() or not link_target.is_relative_to(target.resolve()):
            raise UnsafeArchiveError(f"archive link {name!r} -> {link!r} points outside {target}; "
                                     "refusing to extract")


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract a tar (any compression) or zip archive into ``target``.

    Every member is checked before anything is written.

    Returns:
        The extracted paths.

    Raises:
        UnsafeArchiveError: a member is absolute, contains ``..``, or is a link leaving target.
        ValueError: the file is not a tar or zip archive.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in names:
                _check_member(name, target)
            zf.extractall(target)
        return [target / n for n in names]
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                if member.isdev():
                    raise UnsafeArchiveError(f"archive member {member.name!r} is a device file")
                _check_member(member.name, target,
                              member.linkname if (member.issym() or member.islnk()) else None)
            tf.extractall(target, members=members, filter="data")
        return [target / m.name for m in members]
    raise ValueError(f"{archive} is neither a tar nor a zip archive")


def download(resource: str | Resource, root: str | os.PathLike | None = None, *,
             keep_archive: bool = False, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch, verify and extract a registry entry; return the folder it was extracted into.

    A folder that already holds an extraction (its ``.complete`` marker exists) is returned
    without downloading again.

    Args:
        resource: a key of :data:`REGISTRY` or a :class:`Resource`.
        root: the data root (default :func:`adcore.data.data_root`).
        keep_archive: keep the archive after extraction.
        progress: show a progress bar.
        timeout: seconds to wait for the server.
    """
    if isinstance(resource, str):
        if resource not in REGISTRY:
            raise ValueError(f"unknown resource {resource!r}; known: {sorted(REGISTRY)}")
        resource = REGISTRY[resource]
    root = Path(root) if root is not None else data_root()
    folder = root / resource.name
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    archive = fetch(resource.url, root / resource.filename, resource.sha256,
                    timeout=timeout, progress=progress)
    staging = root / f".{resource.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        safe_extract(archive, staging)
        # Archives often wrap everything in one folder named like the resource: unwrap it.
        entries = list(staging.iterdir())
        inner = entries[0] if len(entries) == 1 and entries[0].is_dir() and \
            entries[0].name == resource.name else staging
        folder.mkdir(parents=True, exist_ok=True)
        for entry in inner.iterdir():
            os.replace(entry, folder / entry.name)
        marker.write_text(resource.sha256 + "\n")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if not keep_archive:
        archive.unlink()
    return folder
