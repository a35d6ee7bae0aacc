"""The download registry, offline: a local HTTP server on 127.0.0.1 serves archives the tests build."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from adcore.data import Resource, download, safe_extract
from adcore.data.download import ChecksumError, UnsafeArchiveError, fetch


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve ``tmp_path/served`` on an ephemeral loopback port; yield (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args, **kwargs: None  # keep test output quiet
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    finally:
        httpd.shutdown()
        httpd.server_close()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(server: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = server
    archive = _tar(folder / "toy.tar.gz", {"toy/cat/train/good/000.png": b"png-bytes",
                                            "toy/readme.txt": b"hello"})
    resource = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=_sha(archive),
                        filename="toy.tar.gz")
    root = tmp_path / "data"
    out = download(resource, root, progress=False, timeout=5)
    assert out == root / "toy"
    assert (out / "cat" / "train" / "good" / "000.png").read_bytes() == b"png-bytes"
    assert not (root / "toy.tar.gz").exists()  # the archive is removed after extraction
    # A second call finds the completed extraction and downloads nothing.
    archive.unlink()
    assert download(resource, root, progress=False, timeout=5) == out


def test_checksum_mismatch_deletes_the_file(server: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = server
    (folder / "blob.bin").write_bytes(b"some bytes")
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumError, match="checksum mismatch .* expected 0{64}"):
        fetch(f"{url}/blob.bin", dest, "0" * 64, progress=False, timeout=5)
    assert not dest.exists() and not (tmp_path / "blob.bin.part").exists()


def test_unknown_resource_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="mvtec_ad"):
        download("nope")


@pytest.mark.parametrize("name", ["../escape.txt", "/abs/path.txt", "ok/../../escape.txt"])
def test_tar_member_escaping_is_refused(tmp_path: Path, name: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", {"fine.txt": b"x", name: b"evil"})
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(archive, target)
    assert not (target / "fine.txt").exists(), "nothing is extracted when one member is unsafe"
    assert not (tmp_path / "escape.txt").exists()


def test_tar_symlink_out_of_target_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../etc/passwd"
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        safe_extract(archive, tmp_path / "out")


def test_zip_member_escaping_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "evil")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out")
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("a/b.txt", "fine")
    safe_extract(good, tmp_path / "out2")
    assert (tmp_path / "out2" / "a" / "b.txt").read_text() == "fine"


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("plain")
    with pytest.raises(ValueError, match="neither a tar nor a zip"):
        safe_extract(path, tmp_path / "out")
