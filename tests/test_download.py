"""The download registry, offline: local HTTP servers on 127.0.0.1 serve files the tests build.

One server honours HTTP Range requests, one ignores them, one cuts the connection part-way;
the tests check that nothing a user made is destroyed and that every error names the address.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from archive_builders import tar_archive, zip_archive

from adcore.data import REGISTRY, Resource, download, ensure
from adcore.data.download import (
    MARKER,
    STAGING_MARKER,
    ChecksumError,
    DownloadError,
    IncompleteDownloadError,
    UnverifiedResourceError,
    fetch,
)
from adcore.data.extract import UnsafeArchiveError


@dataclass
class Behaviour:
    """What the test server does: its files, Range support, and how many responses it cuts."""

    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    cuts: int = 0            # the first `cuts` responses stop after `cut_at` bytes
    cut_at: int = 1000
    ranges: list[str | None] = field(default_factory=list)


@pytest.fixture()
def server() -> Iterator[tuple[str, Behaviour]]:
    """Serve a :class:`Behaviour` on an ephemeral loopback port; yield (base URL, behaviour)."""
    behaviour = Behaviour()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            data = behaviour.files.get(self.path.lstrip("/"))
            behaviour.ranges.append(self.headers.get("Range"))
            if data is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if match and behaviour.honour_range:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if behaviour.cuts > 0:
                behaviour.cuts -= 1
                self.wfile.write(body[:behaviour.cut_at])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", behaviour
    finally:
        httpd.shutdown()
        httpd.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(n: int = 5000) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def _toy_tar(tmp_path: Path) -> bytes:
    path = tar_archive(tmp_path / "toy.tar.gz", {"toy/cat/train/good/000.png": b"png-bytes",
                                                  "toy/readme.txt": b"hello"})
    return path.read_bytes()


@pytest.fixture(autouse=True)
def _no_shared_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Isolate the tests from any real shared data folder on the machine."""
    empty = tmp_path / "no-shared"
    empty.mkdir()
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(empty))


# --------------------------------------------------------------------------- fetch
def test_download_verifies_and_extracts(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = data = _toy_tar(tmp_path)
    resource = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=_sha(data),
                        filename="toy.tar.gz")
    root = tmp_path / "data"
    out = download(resource, root, progress=False, timeout=5)
    assert out == root / "toy"
    assert (out / "cat" / "train" / "good" / "000.png").read_bytes() == b"png-bytes"
    assert (out / MARKER).read_text().startswith(f"sha256:{_sha(data)}")
    assert not (root / "toy.tar.gz").exists()  # the archive is removed after extraction
    assert not list(root.glob(".toy.partial-*"))
    # A second call finds the completed extraction and downloads nothing.
    behaviour.files.clear()
    assert download(resource, root, progress=False, timeout=5) == out


def test_checksum_mismatch_deletes_the_file(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["blob.bin"] = b"some bytes"
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumError, match="checksum mismatch .* expected 0{64}"):
        fetch(f"{url}/blob.bin", dest, "0" * 64, progress=False, timeout=5)
    assert not dest.exists() and not (tmp_path / "blob.bin.part").exists()


def test_cut_connection_resumes_with_a_range_request(server: tuple[str, Behaviour],
                                                     tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["big.bin"] = data = _payload()
    behaviour.cuts = 1
    out = fetch(f"{url}/big.bin", tmp_path / "big.bin", _sha(data), progress=False, timeout=5,
                retry_wait=0)
    assert out.read_bytes() == data
    assert behaviour.ranges == [None, "bytes=1000-"]


def test_short_read_is_reported_as_incomplete_and_resumed_later(server: tuple[str, Behaviour],
                                                                tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["big.bin"] = data = _payload()
    behaviour.cuts = 5
    dest = tmp_path / "big.bin"
    with pytest.raises(IncompleteDownloadError,
                       match=rf"incomplete download \(got 1000 of 5000 bytes\) from {url}/big.bin"):
        fetch(f"{url}/big.bin", dest, _sha(data), progress=False, timeout=5, retries=0)
    part = tmp_path / "big.bin.part"
    assert part.stat().st_size == 1000  # kept, not reported as a checksum mismatch
    behaviour.cuts = 0
    assert fetch(f"{url}/big.bin", dest, _sha(data), progress=False, timeout=5).read_bytes() == data
    assert behaviour.ranges[-1] == "bytes=1000-" and not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: tuple[str, Behaviour],
                                                  tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["big.bin"] = data = _payload()
    behaviour.honour_range = False
    behaviour.cuts = 1
    out = fetch(f"{url}/big.bin", tmp_path / "big.bin", _sha(data), progress=False, timeout=5,
                retry_wait=0)
    assert out.read_bytes() == data  # not the first 1000 bytes twice
    assert behaviour.ranges == [None, "bytes=1000-"]


def test_errors_name_the_address(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(DownloadError, match=rf"{url}/missing.bin: HTTP 404"):
        fetch(f"{url}/missing.bin", tmp_path / "m.bin", "0" * 64, progress=False, timeout=5)
    with pytest.raises(DownloadError, match=r"cannot reach http://127.0.0.1:1/x.bin"):
        fetch("http://127.0.0.1:1/x.bin", tmp_path / "x.bin", "0" * 64, progress=False, timeout=5)


def test_existing_file_with_another_checksum_is_left_alone(server: tuple[str, Behaviour],
                                                           tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["blob.bin"] = data = b"served bytes"
    mine = tmp_path / "blob.bin"
    mine.write_bytes(b"my own file")
    with pytest.raises(FileExistsError, match="blob.bin exists .* left untouched"):
        fetch(f"{url}/blob.bin", mine, _sha(data), progress=False, timeout=5)
    assert mine.read_bytes() == b"my own file"


def test_mirrors_are_tried_in_order(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = data = _toy_tar(tmp_path)
    resource = Resource(name="toy", url=f"{url}/gone.tar.gz", sha256=_sha(data),
                        filename="toy.tar.gz", mirrors=(f"{url}/toy.tar.gz",))
    assert (ensure(resource, tmp_path / "data", progress=False) / "readme.txt").read_bytes() == b"hello"
    dead = Resource(name="toy2", url=f"{url}/a.tar.gz", sha256=_sha(data), filename="t.tar.gz",
                    mirrors=(f"{url}/b.tar.gz",))
    with pytest.raises(DownloadError, match=r"every address .*a.tar.gz: HTTP 404.*b.tar.gz: HTTP 404"):
        ensure(dead, tmp_path / "data", progress=False)


def test_unverified_archives_need_an_explicit_override(server: tuple[str, Behaviour],
                                                       tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = _toy_tar(tmp_path)
    resource = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=None, filename="toy.tar.gz")
    with pytest.raises(UnverifiedResourceError, match="allow_unverified=True"):
        ensure(resource, tmp_path / "data", progress=False)
    assert behaviour.ranges == []  # refused before any request
    out = ensure(resource, tmp_path / "data", progress=False, allow_unverified=True)
    assert (out / MARKER).read_text().startswith("unverified")


def test_md5_only_entries_are_verified(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = data = _toy_tar(tmp_path)
    good = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=None,
                    md5=hashlib.md5(data).hexdigest(), filename="toy.tar.gz")
    assert (ensure(good, tmp_path / "a", progress=False) / MARKER).read_text().startswith("md5:")
    bad = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=None, md5="0" * 32,
                   filename="toy.tar.gz")
    with pytest.raises(ChecksumError, match="got md5"):
        ensure(bad, tmp_path / "b", progress=False)


def test_registry_entries_are_well_formed() -> None:
    for key, resource in REGISTRY.items():
        assert resource.provenance, key  # every entry says where its address and hash come from
        if resource.sha256:
            assert re.fullmatch(r"[0-9a-f]{64}", resource.sha256), key
        if resource.md5:
            assert re.fullmatch(r"[0-9a-f]{32}", resource.md5), key
        assert resource.urls or resource.local or key == "crack500", key
    assert REGISTRY["mvtec_ad"].url.startswith("https://www.mydrive.ch/shares/150996/")
    assert len(REGISTRY["mvtec_ad"].urls) == 3
    assert REGISTRY["cifar10_python"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert REGISTRY["mvtec_tile"].checksum is None  # unknown: needs allow_unverified


def test_unknown_resource_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="mvtec_ad"):
        download("nope")


def test_entry_without_address_or_copy_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="crack500.*no download address.*pavement-crack"):
        ensure("crack500", tmp_path)


# --------------------------------------------------------------------------- never destroy
def test_folder_without_marker_is_refused_and_untouched(server: tuple[str, Behaviour],
                                                        tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = data = _toy_tar(tmp_path)
    resource = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=_sha(data),
                        filename="toy.tar.gz")
    mine = tmp_path / "data" / "toy"
    mine.mkdir(parents=True)
    (mine / "readme.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"toy exists but has no \.complete marker"):
        ensure(resource, tmp_path / "data", progress=False)
    assert (mine / "readme.txt").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["readme.txt"]
    assert behaviour.ranges == []


def test_interrupted_extractions_are_redone(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = data = _toy_tar(tmp_path)
    resource = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=_sha(data),
                        filename="toy.tar.gz")
    root = tmp_path / "data"
    half = root / "toy"               # a half-moved folder of ours (it carries the staging mark)
    (half / "cat").mkdir(parents=True)
    (half / STAGING_MARKER).write_text("staging\n")
    stale = root / ".toy.partial-999999999"  # a dead run's staging folder
    stale.mkdir()
    (stale / "junk").write_text("x")
    out = ensure(resource, root, progress=False)
    assert (out / "readme.txt").read_bytes() == b"hello" and (out / MARKER).is_file()
    assert not (out / STAGING_MARKER).exists() and not stale.exists()


def test_failed_validation_keeps_nothing(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, behaviour = server
    behaviour.files["toy.tar.gz"] = data = _toy_tar(tmp_path)
    resource = Resource(name="toy", url=f"{url}/toy.tar.gz", sha256=_sha(data),
                        filename="toy.tar.gz")

    def refuse(folder: Path) -> None:
        raise ValueError(f"{folder} is not what was expected")

    with pytest.raises(ValueError, match="not what was expected"):
        ensure(resource, tmp_path / "data", validate=refuse, progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy.tar.gz"]


def test_local_source_is_used_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    archive = zip_archive(shared / "sets" / "toy.zip", {"toy/a.txt": b"local"})
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(shared))
    resource = Resource(name="toy", url="", sha256=_sha(archive.read_bytes()), filename="toy.zip",
                        local=("sets/toy.zip",))
    out = ensure(resource, tmp_path / "data", progress=False)
    assert (out / "a.txt").read_bytes() == b"local" and archive.is_file()  # the copy stays
    damaged = Resource(name="toy2", url="", sha256="1" * 64, filename="toy.zip",
                       local=("sets/toy.zip",))
    with pytest.raises(ChecksumError, match=r"local copy .*toy\.zip.*expected 1{64}"):
        ensure(damaged, tmp_path / "data", progress=False)
    assert archive.is_file()
    absent = Resource(name="toy3", url="", sha256="1" * 64, filename="toy.zip",
                      local=("sets/other.zip",))
    with pytest.raises(FileNotFoundError, match=r"no download address and no local copy .*other\.zip"):
        ensure(absent, tmp_path / "data", progress=False)


def test_resource_size_caps_the_extraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    archive = zip_archive(shared / "many.zip", {f"many/{i}.txt": b"x" for i in range(40)})
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(shared))
    resource = Resource(name="many", url="", sha256=_sha(archive.read_bytes()), filename="many.zip",
                        local=("many.zip",), members=10)
    with pytest.raises(UnsafeArchiveError, match="holds 40 members; expected at most 27"):
        ensure(resource, tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "many").exists()


def test_zip_archive_through_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("wrap/sub/b.txt", b"b")
    (shared).mkdir()
    (shared / "w.zip").write_bytes(buffer.getvalue())
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(shared))
    resource = Resource(name="w", url="", sha256=_sha(buffer.getvalue()), filename="w.zip",
                        local=("w.zip",), strip="wrap")
    assert (ensure(resource, tmp_path / "data") / "sub" / "b.txt").read_bytes() == b"b"


def test_markers_of_earlier_versions_are_honoured(tmp_path: Path) -> None:
    resource = Resource(name="toy", url="", sha256="a" * 64, filename="toy.zip")
    done = tmp_path / "data" / "toy"
    done.mkdir(parents=True)
    (done / MARKER).write_text("a" * 64 + "\n")  # the bare sha256 older versions wrote
    assert ensure(resource, tmp_path / "data") == done
    (done / MARKER).write_text("sha256:" + "b" * 64 + "\n")
    with pytest.raises(FileExistsError, match="holds another version"):
        ensure(resource, tmp_path / "data")


def test_read_only_root_is_refused_with_a_sentence(tmp_path: Path) -> None:
    resource = Resource(name="toy", url="", sha256="a" * 64, filename="toy.zip")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(PermissionError, match="locked: the folder is not writable"):
            ensure(resource, locked)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("name, filename", [("../evil", "a.zip"), ("ok", "../a.zip"), ("", "a.zip")])
def test_resource_names_cannot_leave_the_data_root(tmp_path: Path, name: str, filename: str) -> None:
    resource = Resource(name=name, url="http://127.0.0.1:1/a.zip", sha256="a" * 64,
                        filename=filename)
    with pytest.raises(ValueError, match="expected a plain file or folder name"):
        ensure(resource, tmp_path / "data")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "a.zip").exists()
