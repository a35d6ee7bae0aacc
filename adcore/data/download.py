"""Downloads that never destroy: verified, resumable, extracted safely, completed once.

Every public archive the book can fetch is a :class:`Resource` of :data:`REGISTRY`
(:mod:`adcore.data.registry`). :func:`ensure` (alias :func:`download`) returns the extracted
folder ``<data root>/<resource name>``:

1. a folder holding the ``.complete`` marker with the archive's checksum is returned as is;
2. a folder without that marker was not finished by this package (or holds a user's own
   files): it is refused and left untouched; a staging folder left by an interrupted run is
   removed and redone (it carries its own ``.adcore-staging`` marker);
3. a *local source* (a copy in the shared data folder) is used when present, its checksum
   verified; else the addresses are tried in order (mirrors), each download streamed to a
   ``.part`` file that a later call resumes with an HTTP ``Range`` request when the server
   allows it;
4. the archive is extracted by :func:`adcore.data.extract.safe_extract` into a staging folder,
   checked (optionally) by the caller's ``validate``, marked, and renamed into place in one
   step, so a half-extracted folder is never read.

An archive whose checksum is unknown is refused unless ``allow_unverified=True``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from adcore.data.extract import ArchiveError, UnsafeArchiveError, remove_tree, safe_extract
from adcore.data.registry import REGISTRY, Resource
from adcore.data.root import data_root, shared_data_dir

__all__ = [
    "MARKER",
    "REGISTRY",
    "ChecksumError",
    "DownloadError",
    "IncompleteDownloadError",
    "Resource",
    "UnsafeArchiveError",
    "UnverifiedResourceError",
    "download",
    "ensure",
    "fetch",
    "file_digest",
    "local_candidates",
    "safe_extract",
    "sha256sum",
]

MARKER = ".complete"
STAGING_MARKER = ".adcore-staging"
_CHUNK = 1 << 20
_INTERRUPTIONS = (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout,
                  http.client.HTTPException)


class ChecksumError(ValueError):
    """An archive's checksum differs from the registry's."""


class DownloadError(OSError):
    """A download failed (the message names the address)."""


class IncompleteDownloadError(DownloadError):
    """The connection ended before the whole file arrived (the ``.part`` file is kept)."""


class UnverifiedResourceError(ValueError):
    """The registry knows no checksum for an archive and the caller did not accept that."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = _CHUNK) -> str:
    """The hex digest (``sha256`` or ``md5``) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256sum(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """The hex sha256 of a file, read in chunks."""
    return file_digest(path, "sha256", chunk)


def _expected(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    return None


def _content_range_start(header: str | None) -> tuple[int, int | None] | None:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header."""
    match = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", header or "")
    if not match:
        return None
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _one_attempt(url: str, part: Path, timeout: float, progress: bool, label: str) -> None:
    """Fetch (the rest of) ``url`` into ``part``; raise IncompleteDownloadError on a cut."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "adcore (https://github.com/; research data fetcher)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            return  # nothing left to send: the part may be whole; the checksum decides
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, *_INTERRUPTIONS, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {url}: {reason}") from err
    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        span = _content_range_start(response.headers.get("Content-Range"))
        if have and response.status == 206 and span is not None and span[0] == have:
            mode, total = "ab", span[1]
        elif response.status == 206:
            part.unlink(missing_ok=True)  # a range we did not ask for: start again from zero
            raise IncompleteDownloadError(f"{url} answered with the byte range "
                                          f"{response.headers.get('Content-Range')!r} to a request "
                                          f"for bytes {have}-; restarting from zero")
        else:
            # the server ignored the Range request (status 200): start again from zero
            mode, have = "wb", 0
            total = remaining
        got = 0
        try:
            with open(part, mode) as out, tqdm(total=total, initial=have, unit="B",
                                               unit_scale=True, desc=label,
                                               disable=not progress) as bar:
                while block := response.read(_CHUNK):
                    out.write(block)
                    got += len(block)
                    bar.update(len(block))
        except _INTERRUPTIONS:
            pass  # reported below with the byte counts
    if remaining is not None and got < remaining:
        expected_total = total if total is not None else have + remaining
        raise IncompleteDownloadError(f"incomplete download (got {have + got} of {expected_total} "
                                      f"bytes) from {url}; the partial file {part} is kept and "
                                      "a rerun resumes it")


def fetch(url: str, dest: str | os.PathLike, sha256: str | None, *, md5: str | None = None,
          timeout: float = 60.0, progress: bool = True, retries: int = 3,
          retry_wait: float = 1.0, allow_unverified: bool = False) -> Path:
    """Stream ``url`` to ``dest`` and verify its checksum, resuming interrupted transfers.

    The bytes go to ``dest.part``; a cut connection is retried ``retries`` times, each time
    asking only for the missing bytes (HTTP ``Range``; a server that ignores it sends the whole
    file again). Only a verified file is renamed to ``dest``.

    Args:
        url: the address.
        dest: where the file goes.
        sha256, md5: expected checksum (sha256 preferred).
        timeout: seconds to wait for the server.
        progress: show a progress bar.
        retries: further attempts after a cut connection.
        retry_wait: seconds before the first retry (doubling each time).
        allow_unverified: accept a file with no known checksum.

    Raises:
        UnverifiedResourceError: no checksum given and ``allow_unverified`` is False.
        FileExistsError: ``dest`` exists with another checksum (it is left untouched).
        DownloadError: the address failed (HTTP error, unreachable); names the address.
        IncompleteDownloadError: still cut after the retries ("got N of M bytes"; the
            partial file is kept for a later resume).
        ChecksumError: the whole file arrived but differs; the partial file is deleted.
    """
    dest = Path(dest)
    expected = _expected(sha256, md5)
    if expected is None and not allow_unverified:
        raise UnverifiedResourceError(f"no checksum is known for {url}; refusing an unverified "
                                      "download (pass allow_unverified=True to accept it)")
    if dest.is_file():
        if expected is None or file_digest(dest, expected[0]) == expected[1]:
            return dest
        raise FileExistsError(f"{dest} exists but its {expected[0]} differs from {expected[1]}; "
                              "it was left untouched: move it away to download again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _one_attempt(url, part, timeout, progress, dest.name)
            break
        except IncompleteDownloadError:
            if attempt == retries:
                raise
            time.sleep(retry_wait * 2 ** attempt)
    if expected is not None:
        actual = file_digest(part, expected[0])
        if actual != expected[1]:
            part.unlink()
            raise ChecksumError(f"checksum mismatch for {url}: got {expected[0]} {actual}, "
                                f"expected {expected[1]}; the downloaded file was deleted")
    os.replace(part, dest)
    return dest


def _lookup(resource: str | Resource) -> Resource:
    if not isinstance(resource, Resource):
        if resource not in REGISTRY:
            raise ValueError(f"unknown resource {resource!r}; known: {sorted(REGISTRY)}")
        resource = REGISTRY[resource]
    for what, value in (("name", resource.name), ("filename", resource.filename)):
        # both become paths under the data root: a separator or '..' would leave it
        if not value or value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError(f"resource {what}={value!r}; expected a plain file or folder name")
    return resource


def local_candidates(resource: str | Resource) -> list[Path]:
    """Where local copies of ``resource`` are looked for (existing or not), in order."""
    resource = _lookup(resource)
    base = shared_data_dir()
    return [base / rel for rel in resource.local] if base is not None else []


def _marker_text(resource: Resource) -> str:
    checksum = resource.checksum
    return f"{checksum[0]}:{checksum[1]}" if checksum else "unverified"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale_staging(root: Path, name: str) -> None:
    """Remove staging folders of this resource left by runs that no longer exist."""
    for staging in root.glob(f".{name}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another process is extracting right now
        remove_tree(staging)  # the name is this package's own: an interrupted run's leftover


def _finished(folder: Path, resource: Resource) -> bool:
    """True when ``folder`` is a completed extraction of ``resource``; raise if foreign."""
    if not (folder.exists() or folder.is_symlink()):
        return False
    marker = folder / MARKER
    if marker.is_file():
        recorded = marker.read_text().split()
        checksum = resource.checksum
        # earlier versions of this package wrote the bare sha256
        if recorded and (recorded[0] == _marker_text(resource)
                         or (checksum is not None and recorded[0] == checksum[1])):
            return True
        raise FileExistsError(f"{folder} holds another version of {resource.name!r} "
                              f"({' '.join(recorded) or 'empty marker'}; expected "
                              f"{_marker_text(resource)}); nothing was changed: move it away "
                              "or choose another data root")
    if (folder / STAGING_MARKER).is_file():
        remove_tree(folder)  # our own half-moved staging folder: redo it
        return False
    raise FileExistsError(f"{folder} exists but has no {MARKER} marker: it was not completed by "
                          "adcore (an interrupted extraction of an older version, or your own "
                          "files); nothing was changed: move it away or choose another data root")


def _obtain_archive(resource: Resource, root: Path, *, allow_unverified: bool, progress: bool,
                    timeout: float) -> tuple[Path, bool]:
    """(archive path, True when it was downloaded here) from a local source or the mirrors."""
    checksum = resource.checksum
    for candidate in local_candidates(resource):
        if candidate.is_file():
            if checksum is not None:
                actual = file_digest(candidate, checksum[0])
                if actual != checksum[1]:
                    raise ChecksumError(f"checksum mismatch for the local copy {candidate}: got "
                                        f"{checksum[0]} {actual}, expected {checksum[1]}; the "
                                        "file was left untouched")
            return candidate, False
    if not resource.urls:
        looked = ", ".join(str(c) for c in local_candidates(resource)) or "no shared data folder"
        where = f" (see {resource.homepage})" if resource.homepage else ""
        raise FileNotFoundError(f"{resource.name!r} has no download address and no local copy "
                                f"(looked at: {looked}); obtain {resource.filename} by hand"
                                f"{where}")
    if checksum is None and not allow_unverified:
        raise UnverifiedResourceError(f"no checksum is known for {resource.filename} "
                                      f"({resource.provenance or 'registry'}); refusing an "
                                      "unverified download: pass allow_unverified=True to accept it")
    errors: list[Exception] = []
    for url in resource.urls:
        try:
            path = fetch(url, root / resource.filename, resource.sha256, md5=resource.md5,
                         timeout=timeout, progress=progress,
                         allow_unverified=allow_unverified)
            return path, True
        except IncompleteDownloadError:
            raise  # the partial file belongs to this address: resume it, do not mix mirrors
        except (DownloadError, ChecksumError) as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    kind = ChecksumError if all(isinstance(e, ChecksumError) for e in errors) else DownloadError
    raise kind(f"every address of {resource.name!r} failed: " + " | ".join(map(str, errors)))


def _unwrap(staging: Path, strip: str) -> Path:
    """The folder that becomes the resource folder: the wrapping folder when there is one."""
    entries = [e for e in staging.iterdir() if e.name != STAGING_MARKER]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name == strip:
        (entries[0] / STAGING_MARKER).write_text("staging\n")
        return entries[0]
    return staging


def ensure(resource: str | Resource, root: str | os.PathLike | None = None, *,
           allow_unverified: bool = False, validate: Callable[[Path], None] | None = None,
           keep_archive: bool = False, progress: bool = True, timeout: float = 60.0) -> Path:
    """The extracted folder of a registry entry, obtained and extracted once.

    Args:
        resource: a key of :data:`REGISTRY` or a :class:`Resource`.
        root: the data root (default :func:`adcore.data.data_root`).
        allow_unverified: accept an archive whose checksum the registry does not know.
        validate: called with the extracted folder before it is put in place; raises
            ValueError when the content is not what is expected (nothing is then kept).
        keep_archive: keep a downloaded archive after extraction (local copies are never
            removed).
        progress: show progress bars.
        timeout: seconds to wait for a server.

    Returns:
        ``root / resource.name``, holding the ``.complete`` marker.

    Raises:
        FileExistsError: the folder exists without the marker (left untouched).
        ChecksumError, DownloadError, IncompleteDownloadError, UnverifiedResourceError:
            see :func:`fetch`.
        ArchiveError, UnsafeArchiveError: the archive is damaged or hostile.
        FileNotFoundError: no local copy and no address.
    """
    resource = _lookup(resource)
    root = Path(root) if root is not None else data_root()
    folder = root / resource.name
    if _finished(folder, resource):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot extract {resource.name!r} under {root}: the folder is not "
                              "writable; pass a writable data root (or set ADCORE_DATA)")
    _clear_stale_staging(root, resource.name)
    archive, downloaded = _obtain_archive(resource, root, allow_unverified=allow_unverified,
                                          progress=progress, timeout=timeout)
    staging = root / f".{resource.name}.partial-{os.getpid()}"
    remove_tree(staging)
    staging.mkdir()
    try:
        (staging / STAGING_MARKER).write_text("staging\n")
        try:
            safe_extract(archive, staging, resource.limits, progress=progress)
        except ArchiveError as err:
            raise type(err)(f"{err} (resource {resource.name!r})") from err
        content = _unwrap(staging, resource.strip or resource.name)
        if validate is not None:
            validate(content)
        (content / MARKER).write_text(f"{_marker_text(resource)} {archive.name}\n")
        (content / STAGING_MARKER).unlink()
        try:
            os.rename(content, folder)
        except OSError:
            if not _finished(folder, resource):  # another process finished first: fine
                raise
    finally:
        remove_tree(staging)
    if downloaded and not keep_archive:
        archive.unlink()
    return folder


def download(resource: str | Resource, root: str | os.PathLike | None = None, *,
             keep_archive: bool = False, progress: bool = True, timeout: float = 60.0,
             allow_unverified: bool = False) -> Path:
    """Fetch, verify and extract a registry entry; return its folder (see :func:`ensure`)."""
    return ensure(resource, root, keep_archive=keep_archive, progress=progress, timeout=timeout,
                  allow_unverified=allow_unverified)
