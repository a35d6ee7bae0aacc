"""Safe extraction of tar and zip archives: no member ever lands outside the target folder.

Python's own ``tarfile`` filters are not relied upon (the ``data`` filter of the interpreters
this book supports can be escaped by a chain of nested symlinks, CVE-2025-4517). Every
member is checked from its header before anything is written, and written by this module:

- names: absolute paths, drive letters and ``..`` are refused; ``./`` prefixes (a plain
  ``tar -C dir .`` archive) are accepted and dropped;
- symbolic links: refused when their target is absolute, contains ``..`` or resolves outside
  the target; a member whose path runs *through* a link member is refused;
- hard links: resolved from the archive root (as tar defines them), must name a regular file
  extracted earlier, and are written as copies;
- devices, FIFOs and other special members are refused; permissions keep only the owner's
  execute bit (no set-uid, no world-writable files);
- totals: the member count and the number of bytes actually written are capped, with a clear
  message (a registry entry states its expected size, see :mod:`adcore.data.download`).

Zip members are always written as regular files (zip "symlinks" are not created).
"""

from __future__ import annotations

import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["ArchiveError", "ExtractionLimits", "UnsafeArchiveError", "remove_tree", "safe_extract"]

_CHUNK = 1 << 20
# bz2 is optional in some Python builds; its errors are OSError subclasses anyway
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
            OSError, ValueError, NotImplementedError)


class ArchiveError(ValueError):
    """An archive cannot be read (damaged, truncated, or not an archive at all)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the target folder, or breaks a limit."""


@dataclass(frozen=True)
class ExtractionLimits:
    """Caps on one extraction (a zip or tar bomb is refused, not unpacked).

    Attributes:
        max_bytes: total bytes the members may hold once extracted.
        max_members: number of members.
    """

    max_bytes: int = 20 * 2 ** 30
    max_members: int = 1_000_000


def _normalise(name: str, archive: Path) -> str:
    """The member's relative POSIX path ('' for the archive root), or UnsafeArchiveError."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to "
                                 "extract (expected paths relative to the archive root)")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..' and would be "
                                 "written outside the target; refusing to extract")
    if "\x00" in unified:
        raise UnsafeArchiveError(f"{archive}: member {name!r} holds a NUL byte; refusing to extract")
    return "/".join(parts)


def _through_link(path: str, links: set[str]) -> str | None:
    """The first proper ancestor of ``path`` that is a link member, if any."""
    parts = path.split("/")
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        if prefix in links:
            return prefix
    return None


def _check_symlink(path: str, link: str, archive: Path) -> None:
    if not link or link.startswith(("/", "\\")) or (len(link) > 1 and link[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: link {path!r} -> {link!r} has an absolute or empty "
                                 "target; refusing to extract")
    if ".." in link.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"{archive}: link {path!r} -> {link!r} contains '..' and may "
                                 "point outside the target; refusing to extract")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
    if resolved == ".." or resolved.startswith(("../", "/")):
        raise UnsafeArchiveError(f"{archive}: link {path!r} -> {link!r} points outside the "
                                 "target; refusing to extract")


def _plan_tar(members: list[tarfile.TarInfo], archive: Path,
              limits: ExtractionLimits) -> list[tuple[tarfile.TarInfo, str]]:
    """Check every header before anything is written; return (member, relative path) pairs."""
    if len(members) > limits.max_members:
        raise UnsafeArchiveError(f"{archive} holds {len(members)} members; expected at most "
                                 f"{limits.max_members} (raise the limit if this is intended)")
    plan: list[tuple[tarfile.TarInfo, str]] = []
    links: set[str] = set()
    files: set[str] = set()
    total = 0
    for member in members:
        path = _normalise(member.name, archive)
        if not path:
            continue  # the archive root itself ("./")
        via = _through_link(path, links)
        if via is not None:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} runs through the link "
                                     f"member {via!r}; refusing to extract")
        if path in links:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} would replace the link "
                                     "member of the same name; refusing to extract")
        if member.issym():
            _check_symlink(path, member.linkname, archive)
            links.add(path)
        elif member.islnk():
            # a hard link's target is named from the archive root, not from the member's folder
            target = _normalise(member.linkname, archive)
            if target not in files:
                raise UnsafeArchiveError(f"{archive}: hard link {member.name!r} -> "
                                         f"{member.linkname!r} does not name a regular file "
                                         "extracted before it; refusing to extract")
            links.add(path)
            total += _size_of(plan, target)
        elif member.isreg():
            files.add(path)
            total += member.size
        elif member.isdir():
            pass
        else:
            kind = ("FIFO" if member.isfifo() else
                    "device" if member.ischr() or member.isblk() else "special")
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a {kind} file; "
                                     "refusing to extract")
        if total > limits.max_bytes:
            raise UnsafeArchiveError(f"{archive} would extract to more than {limits.max_bytes} "
                                     f"bytes (at member {member.name!r}); expected at most "
                                     f"{limits.max_bytes}")
        plan.append((member, path))
    return plan


def _size_of(plan: list[tuple[tarfile.TarInfo, str]], path: str) -> int:
    for member, planned in reversed(plan):
        if planned == path and member.isreg():
            return member.size
    return 0


def _safe_parent(target: Path, relative: str, archive: Path, known: set[str]) -> Path:
    """Create the member's parent folders; refuse any existing component that is a link.

    ``known`` holds the folders already checked in this extraction (a folder, once checked,
    cannot turn into a link: link members never replace an existing path).
    """
    parts = relative.split("/")[:-1]
    parent = "/".join(parts)
    if parent in known:
        return target / relative
    current = target
    for part in parts:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeArchiveError(f"{archive}: member {relative!r} runs through {current}, "
                                     "which is not a plain folder; refusing to extract")
    known.add(parent)
    return target / relative


def _open_new(path: Path, mode: int, archive: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        if path.is_symlink():
            raise OSError(f"{path} is a link")
        return os.open(path, flags, mode)
    except OSError as err:
        raise UnsafeArchiveError(f"{archive}: cannot write member {path} safely ({err}); refusing "
                                 "to extract") from err


def _copy_stream(source, path: Path, mode: int, archive: Path, written: list[int],
                 limits: ExtractionLimits) -> None:
    fd = _open_new(path, mode, archive)
    with os.fdopen(fd, "wb") as out:
        while block := source.read(_CHUNK):
            written[0] += len(block)
            if written[0] > limits.max_bytes:
                raise UnsafeArchiveError(f"{archive} extracts to more than {limits.max_bytes} "
                                         f"bytes (at {path.name}); expected at most "
                                         f"{limits.max_bytes}")
            out.write(block)


def _file_mode(mode: int) -> int:
    return 0o755 if mode & 0o100 else 0o644


def _extract_zip(archive: Path, target: Path, limits: ExtractionLimits,
                 progress: bool) -> list[Path]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise UnsafeArchiveError(f"{archive} holds {len(infos)} members; expected at most "
                                     f"{limits.max_members}")
        plan = [(info, _normalise(info.filename, archive)) for info in infos]
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_bytes:
            raise UnsafeArchiveError(f"{archive} would extract to {declared} bytes; expected at "
                                     f"most {limits.max_bytes}")
        written, out, known = [0], [], set()
        for info, path in tqdm(plan, desc=f"extract {archive.name}", unit="file",
                               disable=not progress):
            if not path:
                continue
            if info.is_dir():
                _safe_parent(target, path + "/x", archive, known)
                continue
            dest = _safe_parent(target, path, archive, known)
            with zf.open(info) as source:
                # sizes are counted as written: a zip's declared sizes can lie
                _copy_stream(source, dest, _file_mode(info.external_attr >> 16), archive,
                             written, limits)
            out.append(dest)
        return out


def _extract_tar(archive: Path, target: Path, limits: ExtractionLimits,
                 progress: bool) -> list[Path]:
    with tarfile.open(archive) as tf:
        plan = _plan_tar(tf.getmembers(), archive, limits)
        written, out, known = [0], [], set()
        for member, path in tqdm(plan, desc=f"extract {archive.name}", unit="file",
                                 disable=not progress):
            if member.isdir():
                _safe_parent(target, path + "/x", archive, known)
                continue
            dest = _safe_parent(target, path, archive, known)
            if member.issym():
                if dest.exists() or dest.is_symlink():
                    raise UnsafeArchiveError(f"{archive}: link member {member.name!r} would replace "
                                             f"{dest}; refusing to extract")
                os.symlink(member.linkname, dest)
            elif member.islnk():
                source = _safe_parent(target, _normalise(member.linkname, archive), archive, known)
                with open(source, "rb") as handle:
                    _copy_stream(handle, dest, _file_mode(member.mode), archive, written, limits)
            else:
                handle = tf.extractfile(member)
                if handle is None:
                    raise ArchiveError(f"{archive}: member {member.name!r} has no data")
                with handle:
                    _copy_stream(handle, dest, _file_mode(member.mode), archive, written, limits)
            out.append(dest)
        return out


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike,
                 limits: ExtractionLimits | None = None, *, progress: bool = False) -> list[Path]:
    """Extract a tar (any compression) or zip archive into ``target``, member by member.

    Every tar header is checked before anything is written (see the module docstring for
    the rules); a refused archive leaves files only inside ``target``, never outside it.

    Args:
        archive: the archive file.
        target: the folder to extract into (created if missing).
        limits: caps on the total size and member count (default :class:`ExtractionLimits`).
        progress: show a progress bar over the members.

    Returns:
        The extracted files and links.

    Raises:
        UnsafeArchiveError: a member would escape ``target``, or a limit is exceeded.
        ArchiveError: the file is not a tar or zip archive, or is damaged (the message names it).
    """
    archive, target = Path(archive), Path(target)
    limits = limits or ExtractionLimits()
    if not archive.is_file():
        raise FileNotFoundError(f"no archive at {archive}")
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, target, limits, progress)
        if tarfile.is_tarfile(archive):
            return _extract_tar(archive, target, limits, progress)
    except ArchiveError:
        raise
    except getattr(tarfile, "FilterError", ()) as err:  # never used, but never leaked either
        raise UnsafeArchiveError(f"{archive}: {err}; refusing to extract") from err
    except _CORRUPT as err:
        raise ArchiveError(f"{archive} is damaged or truncated: {type(err).__name__}: {err}; "
                           "expected a complete tar or zip archive") from err
    raise ArchiveError(f"{archive} is neither a tar nor a zip archive")


def remove_tree(folder: Path) -> None:
    """Remove a folder this package created (links inside are removed, never followed)."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
